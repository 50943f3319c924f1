"""Checklist 2 + convert-official: parameter counts, official key names, official_tiny.pt outputs."""

import sys
from pathlib import Path

import pytest
import torch

from meddiffusion3d.config import Config, build_autoencoder, build_discriminator
from meddiffusion3d.convert import config_from_official_to_config, convert_state_dict
from medsynth_core.cli import UserError

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import paper_keys, tiny_fixture  # noqa: E402


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_paper_keys_shapes_and_counts_map():
    keys = paper_keys()
    for name, n_params in (("patchvolume_ae_4x", 8_485_641), ("patchvolume_ae_8x", 34_818_921)):
        entry = keys[name]
        cfg = config_from_official_to_config(entry["constructor"])
        ae, disc = build_autoencoder(cfg.ae), build_discriminator(cfg.ae)
        assert _count(ae) == n_params == entry["num_params"]
        bd = entry["num_params_breakdown"]
        assert _count(ae.encoder) == bd["encoder"] and _count(ae.decoder) == bd["decoder"]
        assert _count(ae.codebook) == 0
        assert _count(disc) == bd["volume_discriminator"] == 2_772_321
        fake = {k: torch.zeros(shape) for k, shape in entry["state_dict"].items()}
        states, report = convert_state_dict(fake)
        assert report["unmapped"] == []
        assert all(k.startswith("perceptual_loss.") for k in report["ignored"])
        own_ae, own_d = ae.state_dict(), disc.state_dict()
        assert set(states["ae"]) == set(own_ae) and set(states["disc"]) == set(own_d)
        for k, v in states["ae"].items():
            assert tuple(v.shape) == tuple(own_ae[k].shape), k
        for k, v in states["disc"].items():
            assert tuple(v.shape) == tuple(own_d[k].shape), k
        # the official config maps onto the stage-1 paper settings
        assert cfg.ae.stage1.disc_start == entry["constructor"]["cfg"]["model"]["discriminator_iter_start"]
        assert cfg.data.patch == 64 and cfg.ae.num_groups == 24 and cfg.ae.n_codes == 8192


def _tiny_ae():
    fx = tiny_fixture()["patchvolume_ae"]
    cfg = config_from_official_to_config(fx["constructor"])
    ae = build_autoencoder(cfg.ae)
    states, report = convert_state_dict(fx["state_dict"])
    assert report == {"ignored": [], "unmapped": []}
    ae.load_state_dict(states["ae"])
    return ae.eval(), fx, cfg


def test_official_tiny_autoencoder_outputs():
    ae, fx, cfg = _tiny_ae()
    assert _count(ae) == fx["num_params"] == 253_397
    x, out, p = fx["inputs"]["x"], fx["outputs"], fx["inputs"]["patch_size"]
    assert cfg.data.patch == p
    tol = dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        h = ae.encoder(x)
        torch.testing.assert_close(h, out["encoder_out"], **tol)
        z = ae.encode(x, quantize=False)
        torch.testing.assert_close(z, out["z"], **tol)
        vq = ae.codebook(z)
        torch.testing.assert_close(vq["embeddings"], out["vq_embeddings"], **tol)
        assert torch.equal(vq["encodings"], out["vq_encodings"])
        torch.testing.assert_close(vq["commitment_loss"], out["vq_commitment_loss"], **tol)
        torch.testing.assert_close(vq["perplexity"], out["vq_perplexity"], **tol)
        torch.testing.assert_close(
            ae.decode(out["vq_encodings"], quantize=False), out["decode_from_indices"], **tol
        )
        torch.testing.assert_close(ae.decode(z, quantize=True), out["decode_from_indices"], **tol)
        torch.testing.assert_close(ae.decode_continuous(z), out["decode_continuous_latent"], **tol)
        torch.testing.assert_close(ae.patch_encode(x, patch_size=p), out["patch_encode"], **tol)
        torch.testing.assert_close(
            ae.patch_encode(x, quantize=True, patch_size=p, chunk=3), out["patch_encode_quantized"], **tol
        )
    # an eval-mode pass leaves the (official) codebook untouched
    assert torch.equal(ae.codebook.embeddings, fx["state_dict"]["codebook.embeddings"])


def test_official_tiny_discriminator_outputs():
    fx = tiny_fixture()["volume_discriminator"]
    c = fx["constructor"]
    cfg = Config()
    cfg.ae.disc_channels, cfg.ae.disc_layers, cfg.ae.image_channels = c["ndf"], c["n_layers"], c["input_nc"]
    disc = build_discriminator(cfg.ae)
    assert _count(disc) == fx["num_params"] == 43_673
    disc.load_state_dict(fx["state_dict"])
    x = fx["inputs"]["x"]
    tol = dict(rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        logits, feats = disc.eval()(x)
        torch.testing.assert_close(logits, fx["outputs"]["eval_logits"], **tol)
        assert len(feats) - 1 == len(fx["outputs"]["eval_features"])
        for a, b in zip(feats[:-1], fx["outputs"]["eval_features"]):
            torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(disc.train()(x)[0], fx["outputs"]["train_logits"], **tol)


def test_official_stage2_config_maps_to_stage2_section():
    s2 = {
        "model": {
            "embedding_dim": 8,
            "n_codes": 8192,
            "n_hiddens": 48,
            "lr": 3e-5,
            "downsample": [8, 8, 8],
            "disc_channels": 32,
            "disc_layers": 3,
            "discriminator_iter_start": 0,
            "batch_size": 1,
            "precision": 32,
            "no_random_restart": False,
            "num_groups": 24,
            "stage": 2,
            "perceptual_3d": False,
        },
        "dataset": {"image_channels": 1, "patch_size": 64},
    }
    cfg = config_from_official_to_config(s2)
    assert cfg.ae.stage2.lr == 3e-5 and cfg.ae.stage2.batch_size == 1 and cfg.ae.stage2.disc_start == 0
    assert cfg.ae.downsample == 8 and cfg.ae.random_restart and cfg.ae.stage2.amp == "off"
    with pytest.raises(UserError, match="anisotropic"):
        config_from_official_to_config({"model": {"downsample": [4, 4, 8]}})

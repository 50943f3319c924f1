"""Checklist A (architecture) and official-fixture conversion."""

import json
import math

import pytest
import torch

from mgdcr.convert import config_from_official, convert_state_dict, map_key
from mgdcr.model import DiffAE, ResBlock, preset, timestep_embedding


def _count(m):
    return sum(p.numel() for p in m.parameters())


def test_a1_paper_parameter_count_and_shapes():
    with torch.device("meta"):
        m = DiffAE(preset("paper"))
        x = torch.empty(2, 1, 128, 128)
        z = m.encode(x)
        eps = m.unet(x, torch.zeros(2, dtype=torch.long), z)
    assert _count(m) == 128_538_241  # spec §1.1: 128.54 M
    assert _count(m.encoder) == 24_671_232  # 24.67 M
    assert abs(_count(m) / 128.54e6 - 1) < 1e-3
    assert tuple(z.shape) == (2, 512)
    assert tuple(eps.shape) == (2, 1, 128, 128)


def test_demo_and_micro_parameter_counts():
    assert abs(_count(DiffAE(preset("demo"))) / 1.19e6 - 1) < 0.01  # spec §8
    assert abs(_count(DiffAE(preset("micro"))) / 0.30e6 - 1) < 0.01


def test_a2_fresh_unet_outputs_zero():
    torch.manual_seed(0)
    m = DiffAE(preset("micro"))
    x = torch.randn(3, 1, 16, 16)
    out = m(x, torch.tensor([0, 500, 999]), x_start=torch.rand_like(x))
    assert torch.equal(out, torch.zeros_like(out))


def test_a3_zeroed_z_projection_makes_block_independent_of_z():
    torch.manual_seed(0)
    blk = ResBlock(16, 16, 8, emb_channels=32, cond_channels=24)
    torch.nn.init.normal_(blk.out_layers[-1].weight)  # make the output path non-trivial
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 32)
    a = blk(x, emb, torch.randn(2, 24))
    b = blk(x, emb, torch.randn(2, 24))
    assert (a - b).abs().max() > 1e-4  # z matters before zeroing
    torch.nn.init.zeros_(blk.cond_emb_layers[1].weight)
    torch.nn.init.zeros_(blk.cond_emb_layers[1].bias)
    torch.testing.assert_close(
        blk(x, emb, torch.randn(2, 24)), blk(x, emb, torch.randn(2, 24)), rtol=0, atol=0
    )


def test_a4_time_embedding_cos_then_sin():
    t = torch.tensor([0, 7, 613, 999])
    dim = 128
    emb = timestep_embedding(t, dim)
    half = dim // 2
    # the official sinusoid forms t·f in float32 (as we do); the reference is cos/sin of that argument
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    for b, tv in enumerate(t.tolist()):
        for i in (0, 1, 17, half - 1):
            arg = float(torch.tensor(float(tv)) * freqs[i])
            assert abs(arg - tv * math.exp(-math.log(10000.0) * i / half)) < 1e-4 * max(1, tv)
            assert abs(emb[b, i].item() - math.cos(arg)) < 1e-6
            assert abs(emb[b, half + i].item() - math.sin(arg)) < 1e-6


def test_official_paper_keys_all_map(ref_dir):
    entry = json.loads((ref_dir / "official_keys_paper.json").read_text())["beatgans_autoenc_paper"]
    cfg = config_from_official(entry["constructor"])
    with torch.device("meta"):
        m = DiffAE(cfg)
    own = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    official = {k: tuple(s) for k, s in entry["state_dict"].items()}
    assert len(official) == len(own)
    for k, s in official.items():
        assert own[map_key(k)] == s, k
    assert _count(m) == entry["num_params"]
    assert _count(m.encoder) == entry["num_params_encoder"]


def test_official_tiny_outputs(ref_dir):
    d = torch.load(ref_dir / "official_tiny.pt", weights_only=True)["beatgans_autoenc_tiny"]
    m = DiffAE(config_from_official(d["constructor"])).eval()
    assert _count(m) == d["num_params"]
    state, unmapped = convert_state_dict(d["state_dict"], m)
    assert unmapped == []
    m.load_state_dict(state)
    i, o = d["inputs"], d["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(m.encode(i["x_start"]), o["cond"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(i["x_t"], i["t"], x_start=i["x_start"]), o["pred"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            m(i["x_t"], i["t"], z=i["cond_given"]), o["pred_with_cond_given"], rtol=1e-4, atol=1e-4
        )
        torch.testing.assert_close(m.unet.embed_time(i["t"]), o["time_emb"], rtol=1e-4, atol=1e-4)


def test_lightning_prefixes_convert(ref_dir):
    d = torch.load(ref_dir / "official_tiny.pt", weights_only=True)["beatgans_autoenc_tiny"]
    m = DiffAE(config_from_official(d["constructor"]))
    sd = d["state_dict"]
    light = {
        **{"model." + k: v for k, v in sd.items()},
        **{"ema_model." + k: v * 2 for k, v in sd.items()},
        "x_T": torch.zeros(1),
    }
    ema, un = convert_state_dict(light, m)  # EMA weights by default
    assert un == ["x_T"]
    raw, _ = convert_state_dict(light, m, prefix="model.")
    k = "unet.out.2.weight"
    torch.testing.assert_close(ema[k], 2 * raw[k])


def test_unsupported_official_constructor_is_rejected():
    from medsynth_core.cli import UserError

    with pytest.raises(UserError, match="resnet_two_cond"):
        config_from_official({"resnet_two_cond": False, "embed_channels": 64})

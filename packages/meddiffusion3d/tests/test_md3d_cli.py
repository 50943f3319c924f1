"""CLI and end to end: demo (stage 1 → resume → stage 2 → encode → decode → metrics), encode/decode/evaluate
verbs on its checkpoint, summary, convert-official of an official-style checkpoint, user errors, metrics (13)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiffusion3d.cli import main
from medsynth_core import io as mio

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import DEMO, PAPER, tiny_fixture  # noqa: E402


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_demo_end_to_end(demo_out):
    m = json.loads((demo_out / "metrics.json").read_text())
    assert (demo_out / "figure.png").stat().st_size > 1000
    for s in ("stage1", "stage2"):
        assert np.isfinite(m[s]["psnr_mean"]) and 0 < m[s]["psnr_mean"] < 60
        assert -1 <= m[s]["ssim_mean"] <= 1
    assert m["latent_shape"] == [4, 8, 8, 8]
    assert m["latent_norm_roundtrip_max_err"] < 1e-5
    assert m["nifti_roundtrip_geometry_ok"]
    assert m["steps"]["resumed_stage1_at"] == 3
    # stage 2 (run through train-ae) kept encoder, pre-VQ conv and codebook of stage 1; the decoder moved
    from medsynth_core.checkpoint import load_checkpoint

    s1 = load_checkpoint(m["checkpoints"]["stage1"], kind="meddiffusion3d-ae")["models"]["ae"]
    s2 = load_checkpoint(m["checkpoints"]["stage2"], kind="meddiffusion3d-ae")
    assert s2["extra"]["stage"] == 2
    for k, v in s1.items():
        if k.startswith(("encoder.", "pre_vq_conv.", "codebook.")):
            assert torch.equal(v, s2["models"]["ae"][k]), k
    assert not torch.equal(s1["decoder.conv_first.weight"], s2["models"]["ae"]["decoder.conv_first.weight"])


@pytest.mark.slow
def test_encode_decode_evaluate_verbs(demo_out, tmp_path, capsys):
    ck = sorted((demo_out / "runs" / "meddiffusion3d" / "demo" / "stage2" / "checkpoints").glob("step_*.pt"))[
        -1
    ]
    vol = np.linspace(0, 1, 32 * 32 * 24, dtype=np.float32).reshape(32, 32, 24)
    aff = np.diag([0.8, 0.8, 1.2, 1.0])
    mio.write_image(mio.MedicalImage.from_dhw(vol, aff), tmp_path / "in" / "case.nii.gz")
    # 24 is not a multiple of the 16³ patch: clear error, then --pad
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ck),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "lat"),
            ]
        )
        == 2
    )
    assert "--pad" in capsys.readouterr().err
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(ck),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "lat"),
                "--pad",
                "--chunk",
                "2",
            ]
        )
        == 0
    )
    lat = torch.load(tmp_path / "lat" / "case.latent.pt", weights_only=True)
    assert lat["latent"].shape == (4, 8, 8, 8) and lat["shape"] == [32, 32, 24]
    assert (
        main(
            [
                "decode",
                "--checkpoint",
                str(ck),
                "--input",
                str(tmp_path / "lat"),
                "--out",
                str(tmp_path / "dec"),
                "--tile",
                "4",
            ]
        )
        == 0
    )
    back = mio.read_image(tmp_path / "dec" / "case.nii.gz")
    assert back.to_dhw().shape == (32, 32, 24) and np.allclose(back.affine, aff)
    assert (tmp_path / "dec" / "case.png").is_file()
    assert main(["evaluate", "--checkpoint", str(ck), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (
        ev["reconstruction"]["n"] == 4
    )  # the 4 training phantoms and np.isfinite(ev["reconstruction"]["psnr_mean"])
    assert (tmp_path / "ev" / "per_case.csv").read_text().startswith("case,psnr,ssim,mae")
    # a foreign file is refused with a clear message
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                str(tmp_path / "foreign.pt"),
                "--input",
                str(tmp_path / "in"),
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "not a medsynth checkpoint" in capsys.readouterr().err


def test_summary_prints_exact_counts(capsys):
    assert main(["summary", "--config", str(PAPER)]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["networks"]["autoencoder"]["total"] == 34_818_921
    assert s["networks"]["discriminator"]["total"] == 2_772_321
    assert s["networks"]["codebook"]["total"] == 0
    assert s["shapes"]["latent_per_patch"] == [8, 8, 8, 8] and s["shapes"]["volume_256_latent"] == [
        8,
        32,
        32,
        32,
    ]
    assert main(["summary", "--config", str(PAPER), "ae.downsample=4"]) == 0
    assert json.loads(capsys.readouterr().out)["networks"]["autoencoder"]["total"] == 8_485_641


def test_config_errors_name_the_key(capsys, tmp_path):
    assert main(["summary", "--config", str(DEMO), "ae.n_hiden=8"]) == 2
    err = capsys.readouterr().err
    assert "ae.n_hiden" in err and "n_hiddens" in err
    assert (
        main(
            [
                "train-ae",
                "--stage",
                "1",
                "--config",
                str(DEMO),
                "data.synthetic=false",
                f"run.root={tmp_path}",
            ]
        )
        == 2
    )
    assert "data.root" in capsys.readouterr().err


def test_part2_verbs_are_not_implemented(capsys):
    assert main(["generate"]) == 3


def test_convert_official_checkpoint_reproduces_fixture(tmp_path):
    fx = tiny_fixture()
    ae_fx, d_fx = fx["patchvolume_ae"], fx["volume_discriminator"]
    sd = dict(ae_fx["state_dict"])
    cons = json.loads(json.dumps(ae_fx["constructor"]))
    # the Lightning module holds the discriminator of its own config; use the fixture's (ndf 8, 2 layers)
    sd.update({f"volume_discriminator.{k}": v for k, v in d_fx["state_dict"].items()})
    sd["perceptual_loss.perceptual_model.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save({"state_dict": sd, "hyper_parameters": cons, "global_step": 7}, tmp_path / "official.ckpt")
    assert main(["convert-official", str(tmp_path / "official.ckpt"), str(tmp_path / "ours.pt")]) == 0
    from meddiffusion3d.train_ae import load_autoencoder

    ae, cfg, ck = load_autoencoder(tmp_path / "ours.pt")
    assert ck["step"] == 7 and ck["extra"]["ignored"] == [
        "perceptual_loss.perceptual_model.lin0.model.1.weight"
    ]
    x, out = ae_fx["inputs"]["x"], ae_fx["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(ae.decode(ae.encode(x)), out["decode_from_indices"], rtol=1e-4, atol=1e-4)
        assert torch.equal(ae.encode(x), out["vq_encodings"])
    # a converted codebook is "initialised": a train-mode forward runs EMA, not a re-init from the batch
    assert not ae.codebook.needs_init


def test_generation_metrics_checklist_13():
    from meddiffusion3d.evaluate import fid, mmd, pairwise_ms_ssim

    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 8, generator=g)
    assert abs(fid(a, a)) < 1e-6 and fid(a, a + 0.5) > 1.0
    assert abs(mmd(a, a)) < 1e-9 and mmd(a, a + 2.0) > 0.1
    v = torch.rand(1, 1, 40, 40, 40, generator=g) * 2 - 1
    smooth = torch.nn.functional.avg_pool3d(v, 5, 1, 2)
    assert pairwise_ms_ssim(torch.cat([smooth, smooth])) == pytest.approx(1.0, abs=1e-5)
    other = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 40, 40, 40, generator=g) * 2 - 1, 5, 1, 2)
    assert pairwise_ms_ssim(torch.cat([smooth, other])) < 0.9

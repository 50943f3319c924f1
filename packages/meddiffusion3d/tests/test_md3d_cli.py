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
    assert main(["demo", "--json", "--chain", "--out", str(out)]) == 0
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
    # checklist 15: latents → BiFlowNet (half + resume) → generate → decode gives finite 32³ volumes; ControlNet
    d = m["diffusion"]
    assert d["generated_shape"] == [2, 1, 32, 32, 32] and d["generated_finite"]
    assert -1 <= d["generated_range"][0] <= d["generated_range"][1] <= 1
    assert d["restored_shape"] == [1, 1, 32, 32, 32] and d["restored_finite"]
    assert np.isfinite(d["restore"]["psnr"]) and d["restore_task"] == "thick_slice"
    assert d["steps"]["resumed_biflownet_at"] == 2
    bf = load_checkpoint(d["checkpoints"]["biflownet"], kind="meddiffusion3d-biflownet")
    assert bf["step"] == 4 and bf["extra"]["latent_shape"] == [4, 8, 8, 8]
    assert sum(v.numel() for k, v in bf["models"]["model"].items() if k != "pos_embed") > 400_000
    cn = load_checkpoint(d["checkpoints"]["controlnet"], kind="meddiffusion3d-controlnet")
    assert cn["step"] == 2 and any(k.startswith("zero_convs.") for k in cn["models"]["controlnet"])
    assert m["total_seconds"] < 180
    # every training loop writes its resolved config beside its checkpoints (issue 17), equal to the one saved in them
    import yaml

    for name, ck, kind in (
        ("stage1", m["checkpoints"]["stage1"], "meddiffusion3d-ae"),
        ("stage2", m["checkpoints"]["stage2"], "meddiffusion3d-ae"),
        ("biflownet", d["checkpoints"]["biflownet"], "meddiffusion3d-biflownet"),
        ("controlnet", d["checkpoints"]["controlnet"], "meddiffusion3d-controlnet"),
    ):
        written = yaml.safe_load((Path(ck).parent.parent / "config.yaml").read_text())
        assert written == load_checkpoint(ck, kind=kind)["config"], name


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
                "encode", "--json",
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
                "encode", "--json",
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
                "decode", "--json",
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
    assert main(["evaluate", "--json", "--checkpoint", str(ck), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # the 4 training phantoms, each scored
    assert ev["reconstruction"]["n"] == 4 and np.isfinite(ev["reconstruction"]["psnr_mean"])
    assert (tmp_path / "ev" / "per_case.csv").read_text().startswith("case,psnr,ssim,mae")
    # a foreign file is refused with a clear message
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    assert (
        main(
            [
                "encode", "--json",
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
    assert main(["summary", "--json", "--config", str(PAPER)]) == 0
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
    # BiFlowNet 8× (spec §2, checklist 9) and ControlNet v1 (spec §4)
    bf = s["networks"]["biflownet"]
    assert (
        bf["total"] == 157_654_880 and bf["trainable"] == 157_654_880 - 36_864 and bf["dit_path"] == 1_934_856
    )
    assert s["networks"]["controlnet_v1"]["total"] == 93_501_720
    assert s["shapes"]["biflownet_in_out"] == [16, 8, 32, 32, 32] and s["shapes"]["controlnet_controls"] == 6
    assert main(["summary", "--json", "--config", str(PAPER), "ae.downsample=4"]) == 0
    assert json.loads(capsys.readouterr().out)["networks"]["autoencoder"]["total"] == 8_485_641


def test_config_errors_name_the_key(capsys, tmp_path):
    assert main(["summary", "--json", "--config", str(DEMO), "ae.n_hiden=8"]) == 2
    err = capsys.readouterr().err
    assert "ae.n_hiden" in err and "n_hiddens" in err
    assert (
        main(
            [
                "train-ae", "--json",
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


@pytest.mark.slow
def test_generate_and_restore_verbs(demo_out, tmp_path, capsys):
    m = json.loads((demo_out / "metrics.json").read_text())["diffusion"]
    bf, cn = m["checkpoints"]["biflownet"], m["checkpoints"]["controlnet"]
    out = tmp_path / "gen"
    args = ["generate", "--checkpoint", bf, "--class", "1", "--shape", "32", "32", "32", "--out", str(out)]
    assert main([*args, "--spacing", "1.5", "1.5", "2.0", "--n", "2", "--steps", "2"]) == 0
    img = mio.read_image(out / "class1_001.nii.gz")
    assert img.to_dhw().shape == (32, 32, 32) and np.allclose(np.diag(img.affine), [1.5, 1.5, 2.0, 1.0])
    assert np.isfinite(img.to_dhw()).all() and (out / "class1_000.png").stat().st_size > 500
    # a shape whose latent is not a multiple of the BiFlowNet grid, and an unknown class: clear errors
    bad = ["generate", "--checkpoint", bf, "--class", "1", "--shape", "32", "32", "24", "--out", str(out)]
    assert main(bad) == 2 and "multiple of" in capsys.readouterr().err
    assert main([*args[:4], "7", *args[5:]]) == 2 and "outside [0, 2)" in capsys.readouterr().err
    # restore: the checkpoint's task (thick slices) simulated from a clean target, PSNR/SSIM written
    vol = json.loads((demo_out / "metrics.json").read_text())
    target = demo_out / "inputs" / "phantom_000.nii.gz"
    assert vol["nifti_roundtrip_geometry_ok"]
    rout = tmp_path / "rest"
    assert (
        main(["restore", "--json", "--checkpoint", cn, "--target", str(target), "--out", str(rout), "--steps", "2"])
        == 0
    )
    rm = json.loads((rout / "metrics.json").read_text())
    assert np.isfinite(rm["psnr"]) and -1 <= rm["ssim"] <= 1 and rm["psnr_degraded"] > 15
    r = mio.read_image(rout / "restored_000.nii.gz")
    assert r.to_dhw().shape == (32, 32, 32) and np.allclose(np.abs(np.diag(r.affine))[:3], [1.5, 1.5, 2.0])
    assert (rout / "degraded_000.nii.gz").is_file()
    # restoring an explicit degraded input works too
    assert (
        main(
            [
                "restore",
                "--checkpoint",
                cn,
                "--input",
                str(target),
                "--out",
                str(tmp_path / "r2"),
                "--steps",
                "1",
            ]
        )
        == 0
    )
    assert main(["restore", "--json", "--checkpoint", cn, "--out", str(tmp_path / "r3")]) == 2


def test_convert_official_checkpoint_reproduces_fixture(tmp_path):
    fx = tiny_fixture()
    ae_fx, d_fx = fx["patchvolume_ae"], fx["volume_discriminator"]
    sd = dict(ae_fx["state_dict"])
    cons = json.loads(json.dumps(ae_fx["constructor"]))
    # the Lightning module holds the discriminator of its own config; use the fixture's (ndf 8, 2 layers)
    sd.update({f"volume_discriminator.{k}": v for k, v in d_fx["state_dict"].items()})
    sd["perceptual_loss.perceptual_model.lin0.model.1.weight"] = torch.zeros(1, 64, 1, 1)
    torch.save({"state_dict": sd, "hyper_parameters": cons, "global_step": 7}, tmp_path / "official.ckpt")
    assert main(["convert-official", "--json", str(tmp_path / "official.ckpt"), str(tmp_path / "ours.pt")]) == 0
    from meddiffusion3d.infer import load_autoencoder

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
    # unbiased torch_two_sample MMD: MMD(A, A) is ~0 (the cross term keeps its diagonal, so slightly < 0)
    assert -0.05 < mmd(a, a) < 0 and mmd(a, a + 2.0) > 0.5
    v = torch.rand(1, 1, 40, 40, 40, generator=g) * 2 - 1
    smooth = torch.nn.functional.avg_pool3d(v, 5, 1, 2)
    assert pairwise_ms_ssim(torch.cat([smooth, smooth])) == pytest.approx(1.0, abs=1e-5)
    other = torch.nn.functional.avg_pool3d(torch.rand(1, 1, 40, 40, 40, generator=g) * 2 - 1, 5, 1, 2)
    assert pairwise_ms_ssim(torch.cat([smooth, other])) < 0.9


def test_convert_official_biflownet_checkpoint_reproduces_fixture(tmp_path, capsys):
    import argparse

    from meddiffusion3d.infer import load_biflownet

    fx = tiny_fixture()["biflownet"]
    c = fx["constructor"]
    sd = fx["state_dict"]
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}
    args = argparse.Namespace(
        model_dim=c["dim"],
        dim_mults=c["dim_mults"],
        num_classes=c["cond_classes"],
        volume_channels=c["channels"],
        use_attn=c["use_sparse_linear_attn"],
        timesteps=300,
        loss_type="l2",
    )
    torch.save({"model": sd, "ema": ema, "args": args, "step": 11}, tmp_path / "official.pt")
    ctor = tmp_path / "ctor.json"
    ctor.write_text(json.dumps(c))
    dst = tmp_path / "ours.pt"
    assert (
        main(["convert-official", "--json", str(tmp_path / "official.pt"), str(dst), "--official-config", str(ctor)])
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["unmapped"] == 0 and rep["ema"] and rep["step"] == 11
    net, cfg, ck = load_biflownet(dst, use_ema=False)
    assert cfg.diffusion.T == 300 and cfg.diffusion.loss == "l2" and cfg.biflownet.sub_volume == 4
    assert sum(p.numel() for p in net.parameters()) == fx["num_params"]
    i, o = fx["inputs"], fx["outputs"]
    with torch.no_grad():
        torch.testing.assert_close(
            net(i["x"], i["time"], y=i["y"], res=i["res"]), o["eps"], rtol=1e-4, atol=1e-4
        )
    ema_net, _, _ = load_biflownet(dst)  # generate/restore use the EMA weights
    assert torch.equal(ema_net.stem.weight, sd["init_conv.weight"] + 0.01)
    # without the constructor the script defaults (8 heads, 24 groups) do not fit: the error names the keys
    assert main(["convert-official", "--json", str(tmp_path / "official.pt"), str(tmp_path / "x.pt")]) == 2
    assert "official.pt" in capsys.readouterr().err
    # the same through overrides instead of a constructor file
    ov = [
        "biflownet.attn_heads=2",
        "biflownet.resnet_groups=4",
        "biflownet.dit_heads=2",
        "biflownet.sub_volume=4",
    ]
    assert main(["convert-official", "--json", str(tmp_path / "official.pt"), str(tmp_path / "y.pt"), *ov]) == 0
    net2, _, _ = load_biflownet(tmp_path / "y.pt", use_ema=False)
    with torch.no_grad():
        torch.testing.assert_close(
            net2(i["x"], i["time"], y=i["y"], res=i["res"]), o["eps"], rtol=1e-4, atol=1e-4
        )


@pytest.mark.slow
def test_controlnet_resume_is_bit_exact_and_base_untouched(demo_out, tmp_path):
    from md3d_testutils import demo_config

    from meddiffusion3d.train_controlnet import KIND, latest_checkpoint, train_controlnet
    from medsynth_core.checkpoint import load_checkpoint

    bf = json.loads((demo_out / "metrics.json").read_text())["diffusion"]["checkpoints"]["biflownet"]
    base_before = {
        k: v.clone()
        for k, v in load_checkpoint(bf, kind="meddiffusion3d-biflownet")["models"]["model"].items()
    }

    def cfg(root, steps):
        return demo_config(
            f"run.root={root}", f"controlnet.base={bf}", f"controlnet.steps={steps}", "data.n_volumes=2"
        )

    train_controlnet(cfg(tmp_path / "a", 2))
    train_controlnet(cfg(tmp_path / "b", 1))
    train_controlnet(cfg(tmp_path / "b", 2))
    a = load_checkpoint(latest_checkpoint(cfg(tmp_path / "a", 2)), kind=KIND)
    b = load_checkpoint(latest_checkpoint(cfg(tmp_path / "b", 2)), kind=KIND)
    assert a["step"] == b["step"] == 2
    for k, v in a["models"]["controlnet"].items():
        assert torch.equal(v, b["models"]["controlnet"][k]), k
    # a one-step denoise preview at the last step (issue 17: every loop writes PNG previews)
    assert (latest_checkpoint(cfg(tmp_path / "a", 2)).parent.parent / "images" / "step_00000002.png").is_file()
    # the zero convs left zero after two steps; the base checkpoint file is unchanged
    assert any(
        a["models"]["controlnet"][k].abs().sum() > 0 for k in a["models"]["controlnet"] if "zero_conv" in k
    )
    after = load_checkpoint(bf, kind="meddiffusion3d-biflownet")["models"]["model"]
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())


@pytest.mark.slow
@pytest.mark.parametrize("cache", [True, False])
def test_controlnet_from_cached_latents_trains_like_per_step_encoding(demo_out, tmp_path, cache):
    """controlnet.cache_latents both ways: the same (deterministic thick-slice) pairs, so the same weights."""
    from md3d_testutils import demo_config

    from meddiffusion3d.train_controlnet import KIND, latest_checkpoint, train_controlnet
    from medsynth_core.checkpoint import load_checkpoint

    bf = json.loads((demo_out / "metrics.json").read_text())["diffusion"]["checkpoints"]["biflownet"]

    def cfg(root, flag):
        return demo_config(
            f"run.root={root}",
            f"controlnet.base={bf}",
            "controlnet.steps=2",
            "data.n_volumes=2",
            f"controlnet.cache_latents={str(flag).lower()}",
        )

    train_controlnet(cfg(tmp_path / "a", cache))
    train_controlnet(cfg(tmp_path / "b", not cache))
    a = load_checkpoint(latest_checkpoint(cfg(tmp_path / "a", cache)), kind=KIND)["models"]["controlnet"]
    b = load_checkpoint(latest_checkpoint(cfg(tmp_path / "b", not cache)), kind=KIND)["models"]["controlnet"]
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=1e-5, atol=1e-6, msg=k)

"""CLI verbs end to end on the micro preset: summary, convert-official, encode, reconstruct, evaluate, demo."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core.io import MedicalImage, read_image, write_image
from medsynth_core.phantoms import cardiac_cine
from mgdcr.cli import main
from mgdcr.geometry import dhw_to_ijk_affine

PKG = Path(__file__).resolve().parents[1]
MICRO = PKG / "configs" / "micro.yaml"


def test_summary_paper_and_demo(capsys):
    assert main(["summary", "--json", "--config", str(PKG / "configs" / "paper.yaml")]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["DiffAE"]["total"] == 128_538_241 and s["SemanticEncoder"]["total"] == 24_671_232
    assert s["shapes"]["z_sem"] == [1, 512]
    assert main(["summary", "--json", "--config", str(PKG / "configs" / "demo.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["DiffAE"]["total"] == 1_185_473
    # the trained-toy config is the micro network (spec §8: 0.30 M parameters)
    for name in ("micro", "toy"):
        assert main(["summary", "--json", "--config", str(PKG / "configs" / f"{name}.yaml")]) == 0
        assert 0.29e6 < json.loads(capsys.readouterr().out)["DiffAE"]["total"] < 0.31e6


def test_convert_official_lightning_checkpoint(tmp_path, ref_dir, capsys):
    d = torch.load(ref_dir / "official_tiny.pt", weights_only=True)["beatgans_autoenc_tiny"]
    sd = d["state_dict"]
    ckpt = {
        "state_dict": {
            **{"model." + k: v * 0.5 for k, v in sd.items()},
            **{"ema_model." + k: v for k, v in sd.items()},
            "x_T": torch.zeros(1),
        },
        "global_step": 7,
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    (tmp_path / "ctor.json").write_text(json.dumps(d["constructor"]))
    assert (
        main(
            [
                "convert-official", "--json",
                str(tmp_path / "last.ckpt"),
                str(tmp_path / "ours.pt"),
                "--constructor",
                str(tmp_path / "ctor.json"),
            ]
        )
        == 0
    )
    assert "x_T" in capsys.readouterr().out
    from mgdcr.infer import load_prior

    model, cfg = load_prior(tmp_path / "ours.pt")
    with torch.no_grad():
        out = model(d["inputs"]["x_t"], d["inputs"]["t"], z=d["inputs"]["cond_given"])
    torch.testing.assert_close(out, d["outputs"]["pred_with_cond_given"], rtol=1e-4, atol=1e-4)  # EMA weights
    raw, _ = load_prior(tmp_path / "ours.pt", use_ema=False)
    torch.testing.assert_close(raw.state_dict()["unet.out.2.weight"], 0.5 * sd["out.2.weight"])
    # a foreign / unreadable file gives a one-line user error (exit 2)
    (tmp_path / "junk.ckpt").write_text("nope")
    assert (
        main(
            [
                "convert-official", "--json",
                str(tmp_path / "junk.ckpt"),
                str(tmp_path / "x.pt"),
                "--constructor",
                str(tmp_path / "ctor.json"),
            ]
        )
        == 2
    )


class OfficialConf:
    """Stands in for the official ``TrainConfig`` that Lightning pickles into ``hyper_parameters``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_convert_official_pickled_hyper_parameters(tmp_path, ref_dir, capsys):
    """A checkpoint whose hyper_parameters hold a pickled object is refused in one line (weights_only); with
    --trust-pickle it loads and the pickled config supplies the constructor (issue 18)."""
    d = torch.load(ref_dir / "official_tiny.pt", weights_only=True)["beatgans_autoenc_tiny"]
    sd = d["state_dict"]
    ckpt = {
        "state_dict": {"ema_model." + k: v for k, v in sd.items()},
        "hyper_parameters": {"conf": OfficialConf(**d["constructor"])},
        "global_step": 3,
    }
    torch.save(ckpt, tmp_path / "official.ckpt")
    args = ["convert-official", "--json", str(tmp_path / "official.ckpt"), str(tmp_path / "ours.pt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--trust-pickle" in err and "OfficialConf" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ours.pt").exists()
    with pytest.warns(RuntimeWarning, match="full pickle"):
        assert main([*args, "--trust-pickle"]) == 0
    from mgdcr.infer import load_prior

    model, _ = load_prior(tmp_path / "ours.pt")
    with torch.no_grad():
        out = model(d["inputs"]["x_t"], d["inputs"]["t"], z=d["inputs"]["cond_given"])
    torch.testing.assert_close(out, d["outputs"]["pred_with_cond_given"], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert (
        main(
            [
                "train", "--json",
                "--config",
                str(MICRO),
                f"run.root={root}",
                "train.steps=1",
                "train.ckpt_every=1",
                "train.sample_every=0",
            ]
        )
        == 0
    )
    return root / "mgdcr" / "micro" / "checkpoints" / "step_00000001.pt"


def _write_phantom(tmp_path):
    ph = cardiac_cine(n_frames=2, n_slices=3, size=16, seed=0)
    sax = tmp_path / "subj_sa.nii.gz"
    write_image(MedicalImage.from_dhw(ph.sax.astype(np.float32), dhw_to_ijk_affine(ph.sax_affine)), sax)
    laxes = []
    for v, p in ph.lax.items():
        a = p.affine
        ijk = np.eye(4)
        ijk[:3, 0], ijk[:3, 1], ijk[:3, 2], ijk[:3, 3] = a[:3, 1], a[:3, 0], a[:3, 2], a[:3, 3]
        path = tmp_path / f"subj_{v}.nii.gz"
        write_image(MedicalImage.from_dhw(p.image[:, None].astype(np.float32), ijk), path)  # (T,1,r,c)
        laxes.append(str(path))
    return ph, sax, laxes


def _reconstruct_args(ckpt, sax, laxes, out, *extra) -> list[str]:
    return [
        "reconstruct",
        "--checkpoint",
        str(ckpt),
        "--sax",
        str(sax),
        "--lax",
        *laxes,
        "--out",
        str(out),
        *extra,
    ]


def test_encode_reconstruct_evaluate(tmp_path, micro_ckpt):
    ph, sax, laxes = _write_phantom(tmp_path)
    assert (
        main(
            [
                "encode", "--json",
                "--checkpoint",
                str(micro_ckpt),
                "--input",
                str(sax),
                "--steps",
                "5",
                "--out",
                str(tmp_path / "lat.pt"),
            ]
        )
        == 0
    )
    lat = torch.load(tmp_path / "lat.pt")
    assert lat["x_T"].shape == (3, 1, 16, 16) and lat["z_sem"].shape == (3, 32)
    out = tmp_path / "rec"
    assert main(_reconstruct_args(micro_ckpt, sax, laxes, out, "--frame", "1", "inverse.iterations=2")) == 0
    vol = out / "subj_sa_frame_1_final_9slice.nii.gz"
    img = read_image(vol)
    assert img.to_dhw().shape == (9, 16, 16)
    np.testing.assert_allclose(img.spacing[2], ph.slice_spacing / 4, rtol=1e-5)
    # dense slice 4 sits on acquired slice 1
    w_dense = img.affine @ np.array([2.0, 3.0, 4.0, 1.0])
    w_sax = ph.sax_affine @ np.array([1.0, 3.0, 2.0, 1.0])
    assert np.abs(w_dense - w_sax).max() < 1e-4
    assert (out / "subj_sa_frame_1_panel.png").is_file()
    assert len(json.loads((out / "subj_sa_frame_1_history.json").read_text())) == 2
    # evaluate against a dense ground truth written on the same grid
    gt = tmp_path / "gt.nii.gz"
    write_image(img.with_array(np.clip(img.array + 0.05, 0, 1)), gt)
    assert (
        main(["evaluate", "--json", "--pred", str(vol), "--gt", str(gt), "--K", "4", "--out", str(tmp_path / "m.json")])
        == 0
    )
    m = json.loads((tmp_path / "m.json").read_text())[vol.name]
    assert 20 < m["heldout_psnr"] < 40 and (tmp_path / "m.csv").is_file()


def test_reconstruct_bad_inputs(tmp_path, micro_ckpt, capsys):
    ph, sax, laxes = _write_phantom(tmp_path)
    g = tmp_path / "g.nii.gz"
    write_image(np.zeros((16, 16, 7), np.float32), g)  # D = 7, but K=4, n=3 needs 9
    rc = main(
        [
            "reconstruct", "--json",
            "--checkpoint",
            str(micro_ckpt),
            "--sax",
            str(sax),
            "--lax-volume",
            str(g),
            "--lax-mask",
            str(g),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "g.nii.gz" in capsys.readouterr().err
    rc = main(
        [
            "reconstruct", "--json",
            "--checkpoint",
            str(micro_ckpt),
            "--sax",
            str(tmp_path / "missing.nii.gz"),
            "--lax",
            *laxes,
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2
    rc = main(
        [
            "reconstruct", "--json",
            "--checkpoint",
            str(micro_ckpt),
            "--sax",
            str(sax),
            "--lax",
            *laxes,
            "--frame",
            "5",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "frame 5" in capsys.readouterr().err
    # issue 18: a 3D (x, y, time) file given as the cine is named as such, not as a bare slice-size mismatch
    xyt = write_image(
        np.random.default_rng(0).random((20, 20, 10)).astype(np.float32), tmp_path / "xyt.nii.gz"
    )
    assert main(_reconstruct_args(micro_ckpt, xyt, laxes, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "xyt.nii.gz: a 3D file is read as one frame of 10 slices of 20x20" in err and "4D SAX cine" in err
    assert not (tmp_path / "o").exists()


def test_demo_end_to_end_micro(tmp_path):
    """The demo verb's plumbing at micro scale (4 training steps, one held-out phantom): files, the held-out
    block, resume once; the margins of the real recipe are checked in test_learns.py."""
    from mgdcr.demo import run_demo

    out = tmp_path / "demo"
    s = run_demo(out, config=MICRO, overrides=["demo.heldout_seeds=[0]"])
    assert (out / "figure.png").is_file()
    m = json.loads((out / "metrics.json").read_text())
    block = m["heldout"]
    assert block["cases"] == 1 and set(block["baselines"]) == {"z_linear", "seeds"}
    assert set(block["psnr_slice_mean_db"]["baselines"]) == {"z_linear", "seeds"}
    assert np.isfinite(block["method"]) and s["ours"] == pytest.approx(block["method"])
    assert m["inverse"]["iterations"] == [3] and m["train"]["resumed_at"] == 2
    assert np.isfinite(m["train"]["final_loss"])
    # z-linear is exact on the acquired slices of the dense volume
    from medsynth_core.io import read_image

    lin = read_image(out / "dense" / "seed000" / "z_linear.nii.gz").to_dhw()
    sax = read_image(out / "heldout" / "seed000" / "input_sax.nii.gz").to_dhw()
    np.testing.assert_allclose(lin[::4], sax, atol=1e-6)
    ck = sorted((out / "runs" / "mgdcr" / "micro" / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in ck] == ["step_00000002.pt", "step_00000004.pt"]
    # held-out seeds that the training used are refused
    from medsynth_core.cli import UserError

    with pytest.raises(UserError, match="heldout_seeds"):
        run_demo(tmp_path / "bad", config=MICRO, overrides=["demo.heldout_seeds=[1]"])


def test_bench_cases_run_on_demo():
    from medsynth_core.bench import run_case
    from mgdcr.bench import cases

    cs = cases("demo")
    assert len(cs) == 3 and len(cases("paper")) == 3
    r = run_case(cs[0], torch.device("cpu"), warmup=0, repeats=1)
    assert r["train_step_s"] > 0 and r["params"] == 1_185_473


def test_reconstruct_heldout_protocol(tmp_path, micro_ckpt, capsys):
    """ex10 via the CLI: a seeded middle slice is dropped and the four methods are scored on it."""
    _, sax, laxes = _write_phantom(tmp_path)
    args = _reconstruct_args(micro_ckpt, sax, laxes, tmp_path / "h", "--heldout", "3", "inverse.iterations=2")
    assert main(args) == 0
    r = json.loads((tmp_path / "h" / "subj_sa_frame_0_heldout.json").read_text())
    assert r["heldout_index"] == 1  # n = 3: only the middle slice has both neighbours
    assert set(r) == {"heldout_index", "linear", "nearest", "diffae_seed", "diffae_lax", "settings"}
    assert all(
        np.isfinite(r[k]["psnr"]) and 0 < r[k]["ssim"] <= 1 for k in ("linear", "diffae_seed", "diffae_lax")
    )
    assert not (tmp_path / "h" / "subj_sa_frame_0_final_9slice.nii.gz").exists()  # no full reconstruction
    rc = main([a for a in args if a not in laxes and a != "--lax"])  # no LAX planes -> user error
    assert rc == 2 and "LAX" in capsys.readouterr().err


def test_demo_with_given_prior(tmp_path, micro_ckpt):
    """``mgdcr demo --prior CKPT`` skips training and reconstructs at the prior's image size."""
    rc = main(
        [
            "demo", "--json",
            "--out",
            str(tmp_path / "d"),
            "--config",
            str(MICRO),
            "--prior",
            str(micro_ckpt),
            "inverse.iterations=1",
            "demo.heldout_seeds=[0]",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert m["train"]["prior"] == str(micro_ckpt) and m["train"]["steps"] is None
    assert m["inverse"]["iterations"] == [1] and m["heldout"]["cases"] == 1
    assert not (tmp_path / "d" / "runs").exists()  # nothing was trained
    assert (tmp_path / "d" / "figure.png").is_file()

"""CLI verbs: summary, synthesize (2D and 3D NIfTI, geometry kept), evaluate (LPIPS skipped), demo, errors."""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from fda_vae.cli import main
from fda_vae.demo import DEMO_CONFIG, DEMO_YAML
from fda_vae.train import train
from medsynth_core.io import read_image

from .conftest import PKG


def test_summary_paper_counts(capsys):
    assert main(["summary", "--json", "--config", str(PKG / "configs" / "paper.yaml"), "loss.w_perc=0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generator"] == {"total": 18_885_266, "trainable": 18_885_266}
    assert out["encoder"]["total"] == 5_557_072
    assert out["decoder_a"]["total"] == out["decoder_b"]["total"] == 6_663_553
    assert out["disc_a"]["total"] == out["disc_b"]["total"] == 692_769
    assert out["latent_1x1_convs"] == 4 * 272
    assert out["inference_path_one_direction"] == 12_221_441
    assert out["shapes"]["mu"] == [1, 16, 64, 64] and out["shapes"]["output"] == [1, 1, 256, 256]


def test_config_errors(capsys):
    assert main(["summary", "--json", "--config", str(PKG / "configs" / "paper.yaml"), "model.chanels=[8]"]) == 2
    assert "chanels" in capsys.readouterr().err
    assert main(["summary", "--json", "--config", str(PKG / "configs" / "paper.yaml"), "data.image_size=250"]) == 2


def test_demo_yaml_matches_embedded():
    import yaml

    assert yaml.safe_load(DEMO_YAML.read_text()) == DEMO_CONFIG


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    from fda_vae.config import Config
    from medsynth_core.config import load_config

    from .conftest import tiny_overrides

    cfg = load_config(Config, PKG / "configs" / "demo.yaml", tiny_overrides(tmp) + ["train.steps=2"])
    return train(cfg)["checkpoint"], tmp


def test_synthesize_2d_and_3d(trained, tmp_path, capsys):
    ckpt, _ = trained
    aff = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 5], [0, 0, 3.0, 2], [0, 0, 0, 1]])
    vol = np.random.default_rng(0).random((20, 24, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "vol.nii.gz"))
    nib.save(nib.Nifti1Image(vol[:, :, 2], aff), str(tmp_path / "slice.nii.gz"))
    for name in ("vol", "slice"):
        out = tmp_path / "out" / f"{name}_synth.nii.gz"
        assert (
            main(
                [
                    "synthesize", "--json",
                    "--checkpoint",
                    ckpt,
                    "--input",
                    str(tmp_path / f"{name}.nii.gz"),
                    "--output",
                    str(out),
                    "--batch-size",
                    "2",
                ]
            )
            == 0
        )
        src, res = read_image(tmp_path / f"{name}.nii.gz"), read_image(out)
        assert res.array.shape == src.array.shape
        np.testing.assert_allclose(res.affine, src.affine, atol=1e-5)
        assert res.array.min() >= -1 and res.array.max() <= 1
        assert (tmp_path / "out" / f"{name}_synth.png").is_file()
    # a 3D volume is translated slice by slice: slice 2 equals the 2D result
    v3 = read_image(tmp_path / "out" / "vol_synth.nii.gz").array[:, :, 2]
    v2 = read_image(tmp_path / "out" / "slice_synth.nii.gz").array
    np.testing.assert_allclose(v3, v2, atol=1e-5)
    # deterministic by default; sampled differs; folder input
    again = tmp_path / "again.nii.gz"
    main(
        [
            "synthesize", "--json",
            "--checkpoint",
            ckpt,
            "--input",
            str(tmp_path / "slice.nii.gz"),
            "--output",
            str(again),
        ]
    )
    np.testing.assert_array_equal(read_image(again).array, v2)
    samp = tmp_path / "samp.nii.gz"
    main(
        [
            "synthesize", "--json",
            "--checkpoint",
            ckpt,
            "--input",
            str(tmp_path / "slice.nii.gz"),
            "--output",
            str(samp),
            "--sample",
            "--seed",
            "3",
        ]
    )
    assert np.abs(read_image(samp).array - v2).max() > 1e-5
    capsys.readouterr()
    # bad inputs
    assert (
        main(
            [
                "synthesize", "--json",
                "--checkpoint",
                ckpt,
                "--input",
                str(tmp_path / "nope.nii.gz"),
                "--output",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 2
    )
    bad = np.full((8, 8), np.nan, np.float32)
    nib.save(nib.Nifti1Image(bad, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    assert (
        main(
            [
                "synthesize", "--json",
                "--checkpoint",
                ckpt,
                "--input",
                str(tmp_path / "nan.nii.gz"),
                "--output",
                str(tmp_path / "x.nii.gz"),
            ]
        )
        == 2
    )
    assert "NaN" in capsys.readouterr().err


def test_evaluate_verb(trained, tmp_path, capsys):
    ckpt, _ = trained
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert main(["evaluate", "--json", "--checkpoint", ckpt, "--out", str(tmp_path), "eval.per_volume=true"]) == 0
    assert any("LPIPS skipped" in str(x.message) for x in w)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["lpips"] is False
    for d in ("a2b", "b2a"):
        for mode in ("deterministic", "sampled"):
            r = m[d][mode]
            assert (
                r["n_slices"] == 2
                and 0 < r["ssim"] <= 1
                and r["mae"] == pytest.approx(2 * r["mae01"], rel=1e-5)
            )
            assert "volume" in r
    assert m["a2b"]["deterministic"]["psnr"] != m["a2b"]["sampled"]["psnr"]
    assert set(m["tasks"]) == {"arterial->venous", "venous->arterial"}  # demo.yaml phases
    rows = (tmp_path / "per_slice.csv").read_text().splitlines()
    assert rows[0].startswith("key,direction,mode,psnr,ssim") and len(rows) == 1 + 2 * 2 * 2
    # several checkpoints (one per phase pair): results per model and per task
    two = tmp_path / "two"
    with pytest.warns(RuntimeWarning, match="LPIPS skipped"):
        assert (
            main(["evaluate", "--json", "--checkpoint", ckpt, ckpt, "--out", str(two), "--modes", "deterministic"]) == 0
        )
    m2 = json.loads((two / "metrics.json").read_text())
    assert len(m2["models"]) == 2 and len((two / "per_slice.csv").read_text().splitlines()) == 1 + 2 * 2 * 2


def test_evaluate_with_lpips_random_backbone(trained):
    from fda_vae.evaluate import evaluate_model
    from fda_vae.infer import load_generator
    from medsynth_core.metrics import LPIPS

    model, cfg = load_generator(trained[0])
    from fda_vae.data import phantom_datasets

    _, val = phantom_datasets(cfg)
    # LPIPS needs 32x32+ inputs for AlexNet; upsample the 16x16 slices
    items = [
        {
            "a": torch.nn.functional.interpolate(val[i]["a"][None], 64)[0],
            "b": torch.nn.functional.interpolate(val[i]["b"][None], 64)[0],
            "key": val[i]["key"],
        }
        for i in range(2)
    ]

    class Up(torch.nn.Module):
        def translate(self, x, src, sample=False, generator=None):
            y = model.translate(torch.nn.functional.interpolate(x, 16), src, sample, generator)
            return torch.nn.functional.interpolate(y, 64)

    s, _ = evaluate_model(Up(), items, ["a2b"], ["deterministic"], lpips=LPIPS(random_backbone=True))
    assert s["a2b"]["deterministic"]["lpips"] >= 0


def test_train_verb_resume_and_errors(trained, tmp_path, capsys):
    from .conftest import tiny_overrides

    ckpt, _ = trained
    args = ["train", "--json", "--config", str(PKG / "configs" / "demo.yaml"), *tiny_overrides(tmp_path)]
    assert main([*args, "train.steps=3", "--resume", ckpt]) == 0
    out = capsys.readouterr().out
    res = json.loads(out[out.index("{") :])
    assert res["start"] == 2 and res["steps"] == 3
    # a foreign checkpoint is refused with a clear message
    from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint

    other = tmp_path / "other.pt"
    atomic_torch_save(build_checkpoint(kind="mgdcr", step=0, models={}), other)
    assert main([*args, "run.name=x", "--resume", str(other)]) == 2
    assert "mgdcr" in capsys.readouterr().err
    # folder data without a root
    assert main(["train", "--json", "--config", str(PKG / "configs" / "paper.yaml"), f"run.root={tmp_path}"]) == 2
    assert "data.root" in capsys.readouterr().err


def test_prepare_verb(tmp_path, capsys):
    from .test_data import _fake_lld

    _fake_lld(tmp_path / "raw", patients=("MR7",))
    args = ["prepare", "--json", str(tmp_path / "raw"), str(tmp_path / "out"), "--phases", "C+V", "C+Delay"]
    assert main([*args, "--no-register"]) == 0  # noise volumes: registration is tested in test_data
    assert json.loads(capsys.readouterr().out)["slices"] == 5
    assert len(list((tmp_path / "out" / "c_v").glob("MR7_*.nii.gz"))) == 5


def test_synthesize_warns_on_constant_input(trained, tmp_path, caplog):
    """Issue 18: an all-zero or constant volume is normalised to zeros; synthesize still writes (the file
    is valid) but says so in one warning naming the file; a normal volume gives no warning."""
    import logging

    ckpt, _ = trained
    cases = {"zeros": np.zeros((12, 12, 3), np.float32), "const": np.full((12, 12, 3), 7.5, np.float32)}
    cases["normal"] = np.random.default_rng(1).random((12, 12, 3)).astype(np.float32)
    for name, vol in cases.items():
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / f"{name}.nii.gz"))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medsynth"):
            argv = ["synthesize", "--checkpoint", ckpt, "--input", str(tmp_path / f"{name}.nii.gz")]
            assert main([*argv, "--output", str(tmp_path / f"{name}_out.nii.gz")]) == 0
        msgs = [r.getMessage() for r in caplog.records if r.name == "medsynth"]
        if name == "normal":
            assert msgs == []
        else:
            assert len(msgs) == 1 and msgs[0].startswith(str(tmp_path / f"{name}.nii.gz")), msgs
            assert ("all zero" if name == "zeros" else "every voxel = 7.5") in msgs[0]

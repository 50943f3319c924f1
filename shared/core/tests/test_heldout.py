"""Tests for medsynth_core.heldout: baselines, scores, NIfTI files, re-scoring, figure and margins."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medsynth_core import heldout as ho


def test_interpolate_matches_torch_and_keeps_type():
    rng = np.random.default_rng(0)
    vol = rng.random((4, 8, 8)).astype(np.float32)
    up = ho.interpolate(vol, (16, 8, 8), "linear")
    ref = F.interpolate(torch.from_numpy(vol)[None, None].double(), size=(16, 8, 8), mode="trilinear",
                        align_corners=False)[0, 0].numpy()
    assert isinstance(up, np.ndarray) and up.dtype == np.float32 and up.shape == (16, 8, 8)
    np.testing.assert_allclose(up, ref, atol=1e-6)
    near = ho.interpolate(torch.from_numpy(vol), (8, 8, 8), "nearest")
    assert isinstance(near, torch.Tensor) and near.dtype == torch.float32
    np.testing.assert_array_equal(near.numpy()[::2], vol)
    np.testing.assert_array_equal(near.numpy()[1::2], vol)
    img = ho.interpolate(vol[0], (16, 16), "bilinear")
    assert img.shape == (16, 16)
    with pytest.raises(ValueError, match="mode"):
        ho.interpolate(vol, (8, 8, 8), "cubic")
    with pytest.raises(ValueError, match="same length"):
        ho.interpolate(vol, (8, 8), "linear")


def test_avgpool_upsample_keeps_constants_and_loses_detail():
    const = np.full((8, 8, 8), 0.3, np.float32)
    np.testing.assert_allclose(ho.avgpool_upsample(const, 4), const, atol=1e-6)
    checker = (np.indices((8, 8)).sum(0) % 2).astype(np.float32)
    np.testing.assert_allclose(ho.avgpool_upsample(checker, 2), 0.5, atol=1e-6)  # detail below the factor
    with pytest.raises(ValueError, match="divisible"):
        ho.avgpool_upsample(np.zeros((6, 6)), 4)


def test_oracle_linear_is_the_least_squares_fit():
    rng = np.random.default_rng(1)
    s = rng.random((16, 16))
    t = 0.7 * s + 0.1 + 0.01 * rng.standard_normal((16, 16))
    fit = ho.oracle_linear(s, t)
    a, b = np.polyfit(s.ravel(), t.ravel(), 1)
    np.testing.assert_allclose(fit, a * s + b, atol=1e-10)
    # a tissue-specific inversion cannot be fitted by one global map
    inv = np.where(s > 0.5, 1 - s, s)
    assert ho.score(np.clip(ho.oracle_linear(s, inv), 0, 1), inv)["psnr_db"] < 20
    np.testing.assert_allclose(ho.oracle_linear(np.ones((4, 4)), t[:4, :4]), t[:4, :4].mean())  # flat source
    # the mask restricts the fit, not the output
    mask = s > 0.5
    masked = ho.oracle_linear(s, inv, mask=mask)
    np.testing.assert_allclose(masked[mask], inv[mask], atol=1e-10)


def test_score_psnr_ssim_definition():
    t = np.zeros((32, 32), np.float32)
    p = t + 0.1
    sc = ho.score(p, t)
    assert sc["psnr_db"] == pytest.approx(20.0, abs=1e-6)
    assert 0.0 < sc["ssim"] <= 1.0
    assert ho.score(torch.ones(1, 1, 8, 8, 8) * 0.5, np.full((8, 8, 8), 0.5))["ssim"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        ho.score(np.full((8, 8), np.nan), t[:8, :8])
    with pytest.raises(ValueError, match="shape"):
        ho.score(np.zeros((8, 8)), np.zeros((8, 9)))


def _task(tmp_path, task=None, n=3, shape=(6, 12, 12)):
    rng = np.random.default_rng(2)
    tk = ho.HeldoutTask(tmp_path / "heldout", task)
    for i in range(n):
        target = rng.random(shape).astype(np.float32)
        src = np.clip(target + 0.2 * rng.standard_normal(shape), 0, 1).astype(np.float32)
        pred = np.clip(target + 0.05 * rng.standard_normal(shape), -0.5, 1.5)  # out of range on purpose
        tk.add_case(f"case{i:02d}", target, pred, {"copy_source": src, "oracle_linear": ho.oracle_linear(src, target)},
                    inputs={"source": src}, metrics={"dice": 0.5 + i / 10})
    return tk


def test_writer_files_summary_and_rescore_agree(tmp_path):
    tk = _task(tmp_path)
    block = tk.summary()
    assert block["cases"] == 3 and block["metric"] == "psnr_db"
    assert set(block["baselines"]) == {"copy_source", "oracle_linear"}
    assert block["method"] > block["baselines"]["oracle_linear"] > block["baselines"]["copy_source"]
    assert block["best_baseline"] == "oracle_linear"
    assert block["margin_db"] == pytest.approx(block["method"] - block["baselines"]["oracle_linear"])
    assert block["per_case"]["case01"]["metrics"]["dice"] == pytest.approx(0.6)
    case = tmp_path / "heldout" / "case00"
    assert sorted(p.name for p in case.iterdir()) == sorted(
        ["input_source.nii.gz", "baseline_copy_source.nii.gz", "baseline_oracle_linear.nii.gz",
         "pred.nii.gz", "target.nii.gz"])
    pred = np.asarray(nib.load(str(case / "pred.nii.gz")).dataobj)
    assert pred.shape == (12, 12, 6) and pred.min() >= 0 and pred.max() <= 1  # disk order, clipped
    doc = ho.write_metrics(tmp_path / "metrics.json", tk, train={"steps": 5, "seconds": 1.0, "final_loss": 0.1})
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == doc and on_disk["train"]["steps"] == 5
    again = ho.rescore(tmp_path / "heldout")
    assert again["method"] == pytest.approx(on_disk["heldout"]["method"], abs=1e-4)
    for name, value in on_disk["heldout"]["baselines"].items():
        assert again["baselines"][name] == pytest.approx(value, abs=1e-4)
    assert again["ssim"]["method"] == pytest.approx(on_disk["heldout"]["ssim"]["method"], abs=1e-5)


def test_several_tasks_and_2d_cases(tmp_path):
    a = _task(tmp_path, "sr", n=2, shape=(16, 16))
    b = _task(tmp_path, "cms", n=1, shape=(16, 16))
    doc = ho.write_metrics(tmp_path / "m.json", [a, b])
    assert set(doc["heldout"]) == {"sr", "cms"} and doc["heldout"]["sr"]["cases"] == 2
    img = nib.load(str(tmp_path / "heldout" / "sr" / "case00" / "target.nii.gz"))
    assert img.shape == (16, 16, 1)  # one-slice volume
    re = ho.rescore(tmp_path / "heldout")
    assert set(re) == {"sr", "cms"}
    assert re["cms"]["method"] == pytest.approx(doc["heldout"]["cms"]["method"], abs=1e-4)
    with pytest.raises(ValueError, match="every task needs a name"):
        ho.write_metrics(tmp_path / "x.json", [a, ho.HeldoutTask(tmp_path / "h2")])


def test_figure_one_row_per_case(tmp_path):
    tk = _task(tmp_path, n=2, shape=(4, 16, 16))
    path = ho.save_heldout_figure(tmp_path / "figure.png", tk, scale=1)
    with Image.open(path) as im:
        w, h = im.size
    rows, titles, cases = tk.figure_rows()
    assert cases == ["case00", "case01"] and len(rows[0]) == 6  # input, 2 baselines, ours, target, error
    assert titles[0][3].startswith("ours ") and titles[0][3].endswith("dB")
    assert w > 6 * 16 and h > 2 * 16
    sag = tk.figure_rows(panel=lambda v: v[:, :, 8])[0]
    assert sag[0][0].shape == (4, 16)
    # baseline_errors: |baseline - target| beside ours' error map, one per baseline
    rows_e, titles_e, _ = tk.figure_rows(baseline_errors=True)
    names = list(tk.per_case["case00"]["baselines"])
    assert titles_e[0][6:] == [f"|{n}-target|" for n in names] and len(rows_e[0]) == 6 + len(names)
    roles = tk.images["case00"]
    mid = roles["target"].shape[0] // 2
    np.testing.assert_allclose(rows_e[0][6], np.abs(roles[f"baseline_{names[0]}"] - roles["target"])[mid])
    assert ho.save_heldout_figure(tmp_path / "figure_e.png", tk, scale=1, baseline_errors=True).is_file()


def test_writer_rejects_bad_input(tmp_path):
    tk = ho.HeldoutTask(tmp_path)
    z = np.zeros((8, 8))
    with pytest.raises(ValueError, match="baseline"):
        tk.add_case("a", z, z, {})
    with pytest.raises(ValueError, match="name"):
        tk.add_case("a/b", z, z, {"copy": z})
    tk.add_case("a", z, z + 0.1, {"copy": z + 0.2})
    with pytest.raises(ValueError, match="twice"):
        tk.add_case("a", z, z, {"copy": z})
    with pytest.raises(ValueError, match="NaN"):
        tk.add_case("b", z, z * np.nan, {"copy": z})
    with pytest.raises(ValueError, match="no cases"):
        ho.HeldoutTask(tmp_path, "empty").summary()


def test_check_margins_reports_misses():
    block = {"metric": "psnr_db", "method": 25.0, "baselines": {"copy_source": 22.0, "oracle_linear": 24.8}}
    assert ho.check_margins(block, {"copy_source": 2.0}) == []
    miss = ho.check_margins(block, {"copy_source": 2.0, "oracle_linear": 0.5})
    assert len(miss) == 1 and "oracle_linear" in miss[0] and "0.30" in miss[0]
    with pytest.raises(KeyError, match="trilinear"):
        ho.check_margins(block, {"trilinear": 0.5})

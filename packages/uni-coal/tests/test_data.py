"""Spec §8.7: task mix, all_hr=False inputs, out-of-volume neighbours, h5 writer mapping, readers, prepare."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from medsynth_core.cli import UserError
from uni_coal.config import DataConfig
from uni_coal.data import (
    SliceDataset,
    input_positions,
    load_h5_volumes,
    make_sample,
    output_plan,
    rescale_uint8,
    sample_task,
    task_name,
)

MODS = ("T1", "PD", "T2")


def test_task_mix_matches_spec():
    rng = np.random.default_rng(0)
    counts = collections.Counter(task_name(*_st(rng)) for _ in range(10_000))
    want = {"identity": 1 / 12, "SR": 1 / 4, "CMS": 1 / 6, "CMSR": 1 / 2}
    for k, p in want.items():
        assert abs(counts[k] / 10_000 - p) < 0.02, (k, counts)


def _st(rng):
    tgt, src, t = sample_task(rng, MODS, ("T1", "T2", "PD"), (4, 6, 2, 1))
    return src, tgt, t


def _vols(d=20, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.integers(1, 256, size=(d, 8, 8)).astype(np.uint8) for m in MODS}


def test_input_offsets_and_all_hr_false():
    assert input_positions(8, 4) == [4, 8, 12, 16]
    v = _vols()
    t = 4
    for k in range(3):
        samples = [
            make_sample(v, "T1", "T2", t, i, MODS, 8, all_hr=False, rng=None)
            for i in range(k * t, (k + 1) * t)
        ]
        for j, s in enumerate(samples):
            assert torch.equal(s["A"], samples[0]["A"])
            assert s["delta"].item() == pytest.approx(j / t)
            assert s["i_a"].item() == k * t
    # neighbour outside the volume -> zero image -> -1
    s = make_sample(v, "T1", "T2", t, 1, MODS, 8, all_hr=False, rng=None)
    assert torch.all(s["A"][0] == -1) and not torch.all(s["A"][1] == -1)
    s = make_sample(v, "T1", "T2", 4, 19, MODS, 8, all_hr=False, rng=None)
    assert torch.all(s["A"][3] == -1) and torch.all(s["A"][2] == -1)
    # all_hr: random phase, i_A in [i_B - t + 1, i_B]
    rng = np.random.default_rng(0)
    ias = {make_sample(v, "T1", "T2", 4, 10, MODS, 8, all_hr=True, rng=rng)["i_a"].item() for _ in range(200)}
    assert ias == {7, 8, 9, 10}
    # one-hot target and B = target slice, normalised x/127.5 - 1
    s = make_sample(v, "T1", "PD", 1, 5, MODS, 8, all_hr=True, rng=rng)
    assert s["c"].tolist() == [0, 1, 0] and s["delta"].item() == 0
    np.testing.assert_allclose(s["B"][0].numpy(), v["PD"][5] / 127.5 - 1, atol=1e-6)


def test_rescale_uint8_official_mapping():
    rng = np.random.default_rng(0)
    vol = np.zeros((6, 10, 10))
    vol[1:5, 2:8, 2:8] = rng.gamma(2.0, 50.0, size=(4, 6, 6)) + 1
    out = rescale_uint8(vol)
    fg = vol > 0
    lo, hi = np.percentile(vol[fg], 0.5), np.percentile(vol[fg], 99.5)
    want = np.clip(np.round((vol[fg] - lo) / (hi - lo) * 255), 1, 255)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[fg], want.astype(np.uint8))
    assert np.all(out[~fg] == 0)
    with pytest.raises(ValueError, match="NaN"):
        rescale_uint8(np.full((2, 2, 2), np.nan))


def test_prepare_and_h5_reader(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(1)
    for subj in ("IXI001", "IXI002"):
        (tmp_path / "in" / subj).mkdir(parents=True)
        for m in ("T1", "T2"):
            arr = rng.random((6, 12, 10)).astype(np.float32) * 100
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing((1.0, 1.0, 2.0))
            sitk.WriteImage(img, str(tmp_path / "in" / subj / f"{subj}-{m}.nii.gz"))
    from uni_coal.cli import main

    assert (
        main(
            [
                "prepare",
                "--input",
                str(tmp_path / "in"),
                "--output",
                str(tmp_path / "h5"),
                "--modalities",
                "T1",
                "T2",
                "--registration",
                "none",  # random arrays: nothing to register; prepare's own tests cover registration
            ]
        )
        == 0
    )
    vols = load_h5_volumes(tmp_path / "h5", ["T1", "T2"])
    assert len(vols) == 2 and vols[0]["T1"].dtype == np.uint8 and vols[0]["T1"].shape[0] == 6
    with pytest.raises(UserError, match="missing datasets"):
        load_h5_volumes(tmp_path / "h5", ["T1", "PD"])
    with pytest.raises(UserError, match="no .h5 files"):
        load_h5_volumes(tmp_path / "in", ["T1"])
    (tmp_path / "list.txt").write_text("IXI002\n")
    assert len(load_h5_volumes(tmp_path / "h5", ["T1"], str(tmp_path / "list.txt"))) == 1


def test_slice_dataset_epoch_determinism():
    cfg = DataConfig(kind="phantom", size=8, thicknesses=(1, 2, 3))
    ds = SliceDataset([_vols(), _vols(seed=1)], cfg, seed=0)
    assert len(ds) == 40
    a = ds[25]
    b = ds[25]
    assert torch.equal(a["A"], b["A"]) and torch.equal(a["delta"], b["delta"])
    assert a["A"].shape == (4, 8, 8) and a["B"].shape == (1, 8, 8)


def test_output_plan_arbitrary_spacing():
    plan = output_plan(3, 4, 1)
    assert [k for k, _ in plan] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert [d for _, d in plan[:4]] == [0, 0.25, 0.5, 0.75]
    plan = output_plan(4, 3, 1.5)  # non-integer scale: output j at j*1.5
    assert [k for k, _ in plan] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert plan[1][1] == pytest.approx(0.5)


@pytest.mark.parametrize("flip", ["none", "subject", "random"])
def test_q7_flip_flag(flip):
    """Q7: "subject" (default, faithful) = the official RandomFlip, one fixed decision per subject in every
    epoch; "random" (the fix) = a fresh decision per item and epoch; "none" = never flipped."""
    assert DataConfig().flip == "subject"
    cfg = DataConfig(kind="phantom", size=8, thicknesses=(1,), sources=("T1",), flip=flip)
    v = _vols()
    ds = SliceDataset([v] * 8, cfg, seed=0)

    def flipped(idx: int) -> bool:
        raw = torch.from_numpy(v["T1"][idx % 20] / 127.5 - 1).float()
        return not torch.allclose(ds[idx]["A"][1], raw, atol=1e-6)

    decisions = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        decisions.append([[flipped(s * 20 + k) for k in range(4, 12)] for s in range(8)])
    flat = [d for ep in decisions for subj in ep for d in subj]
    if flip == "none":
        assert not any(flat)
    elif flip == "subject":  # same decision for every slice of a subject, in every epoch; subjects differ
        assert all(len(set(subj)) == 1 for ep in decisions for subj in ep)
        assert decisions[0] == decisions[1] and any(flat) and not all(flat)
    else:  # a decision per item: slices of one subject differ, and epochs differ
        assert any(len(set(subj)) == 2 for subj in decisions[0])
        assert decisions[0] != decisions[1]
    ds2 = SliceDataset([v] * 8, cfg, seed=0, train=False)  # evaluation never flips
    assert torch.allclose(ds2[25]["A"][1], torch.from_numpy(v["T1"][5] / 127.5 - 1).float(), atol=1e-6)

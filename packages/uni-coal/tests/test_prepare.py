"""`uni-coal prepare` (issue 15): raw NIfTI folders -> the official h5 layout (uint8, LPS, percentile mapping)
with train/test lists, for IXI (T2/PD registered to T1), BraTS19 and ADNI (CMSR + SR pair); the training
loader reads what it writes; bad input is one line naming the file, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from medsynth_core.io import H5ArrayReader
from uni_coal.cli import main
from uni_coal.config import DataConfig
from uni_coal.data import SliceDataset, build_volumes, rescale_uint8

SHAPE = (20, 40, 40)  # (z, y, x)


def anatomy(shape=SHAPE, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A head-like ellipsoid with two inner tissues: (labels 0..3, [3 intensity maps])."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.uint8)
    lab[(z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1] = 1
    lab[(z / 0.6) ** 2 + ((y - 0.15) / 0.45) ** 2 + ((x + 0.1) / 0.3) ** 2 < 1] = 2
    lab[(z / 0.5) ** 2 + ((y + 0.35) / 0.25) ** 2 + ((x - 0.3) / 0.2) ** 2 < 1] = 3
    noise = rng.normal(0, 3, shape)
    maps = {"T1": (0, 300, 600, 450), "T2": (0, 500, 200, 900), "PD": (0, 700, 500, 350)}
    return lab, {
        m: (np.asarray(v, float)[lab] + noise * (lab > 0)).astype(np.float32) for m, v in maps.items()
    }


def write_nii(path, arr, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def ixi_folder(root, n=3, shift_vox=(0, 0, 0), flat=False):
    truth = {}
    for s in range(n):
        subj = f"IXI{s:03d}-Guys-{s}"
        lab, ims = anatomy(seed=s)
        truth[subj] = ims
        for m, arr in ims.items():
            if m != "T1":
                arr = np.roll(arr, shift_vox, axis=(0, 1, 2))  # T2/PD misaligned with T1 (same grid)
            folder = root / f"IXI-{m}" if flat else root / subj
            write_nii(folder / f"{subj}-{m}.nii.gz", arr)
    return truth


def test_ixi_registered_uint8_and_splits(tmp_path, capsys):
    truth = ixi_folder(tmp_path / "raw", n=3, shift_vox=(0, 3, -2), flat=True)  # the IXI download layout
    out = tmp_path / "h5"
    assert (
        main(["prepare", "--json", "--input", str(tmp_path / "raw"), "--output", str(out), "--test-fraction", "0.34"])
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["subjects"] == 3 and rep["keys"] == ["T1", "T2", "PD"] and rep["registration"] == "rigid"
    train = (out / "train.txt").read_text().split()
    test = (out / "test.txt").read_text().split()
    assert len(train) == 2 and len(test) == 1 and sorted(train + test) == sorted(f"{s}.h5" for s in truth)
    for subj, ims in truth.items():
        with H5ArrayReader(out / f"{subj}.h5") as h:
            assert sorted(h.keys()) == ["PD", "T1", "T2"]
            t1, t2 = h["T1"][()], h["T2"][()]
        assert t1.dtype == np.uint8 and t1.shape == SHAPE
        # T1 is the reference: exactly the official mapping of the input
        np.testing.assert_array_equal(t1, rescale_uint8(ims["T1"]))
        # T2 was shifted by (3, -2) voxels; registered back it matches the aligned truth (correlation over the
        # head; the uint8 levels themselves move because interpolated edge voxels enter the percentiles)
        fg = t1 > 0
        want = rescale_uint8(ims["T2"]).astype(float)[fg]
        shifted = rescale_uint8(np.roll(ims["T2"], (3, -2), axis=(1, 2))).astype(float)[fg]
        r_reg, r_raw = np.corrcoef(t2[fg], want)[0, 1], np.corrcoef(shifted, want)[0, 1]
        assert r_reg > 0.995 and r_raw < 0.6, (subj, r_reg, r_raw)
        assert t2.max() == 255


def test_loader_reads_what_prepare_writes(tmp_path):
    ixi_folder(tmp_path / "raw", n=2)
    out = tmp_path / "h5"
    assert (
        main(["prepare", "--json", "--input", str(tmp_path / "raw"), "--output", str(out), "--registration", "none"])
        == 0
    )
    cfg = DataConfig(
        kind="h5", root=str(out), train_list=str(out / "train.txt"), test_list=str(out / "test.txt"), size=32
    )
    train, test = build_volumes(cfg, "train"), build_volumes(cfg, "test")
    assert len(train) == 1 and len(test) == 1 and set(train[0]) == {"T1", "PD", "T2"}
    ds = SliceDataset(train, cfg, seed=0)
    assert len(ds) == SHAPE[0]
    item = ds[SHAPE[0] // 2]
    assert item["A"].shape == (4, 32, 32) and item["B"].shape == (1, 32, 32) and item["c"].shape == (3,)
    assert float(item["B"].min()) >= -1 and float(item["B"].max()) <= 1 and float(item["B"].max()) > 0.5


def test_brats_layout_keeps_seg_labels(tmp_path, capsys):
    raw = tmp_path / "raw"
    for s in ("BraTS19_CBICA_AAA_1", "BraTS19_TCIA_BBB_1"):
        lab, ims = anatomy(seed=len(s))
        for m, src in (("t1", "T1"), ("t2", "T2"), ("flair", "PD")):
            write_nii(raw / s / f"{s}_{m}.nii.gz", ims[src])
        write_nii(raw / s / f"{s}_t1ce.nii.gz", ims["T1"])  # ignored, and must not pass for t1
        seg = np.where(lab == 3, 4, np.where(lab == 2, 2, 0)).astype(np.uint8)  # BraTS labels 0/1/2/4
        write_nii(raw / s / f"{s}_seg.nii.gz", seg)
    out = tmp_path / "h5"
    assert main(["prepare", "--json", "--layout", "brats19", "--input", str(raw), "--output", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (
        rep["keys"] == ["t1", "t2", "flair", "seg"] and rep["registration"] == "none" and rep["subjects"] == 2
    )
    with H5ArrayReader(out / "BraTS19_CBICA_AAA_1.h5") as h:
        assert sorted(h.keys()) == ["flair", "seg", "t1", "t2"]
        assert all(h[k][()].dtype == np.uint8 and h[k][()].shape == SHAPE for k in h.keys())
        assert set(np.unique(h["seg"][()])) == {0, 2, 4}
    cfg = DataConfig(kind="h5", root=str(out), modalities=("t2",), sources=("t1",), thicknesses=(1,), size=32)
    assert len(SliceDataset(build_volumes(cfg, "train"), cfg)) == 2 * SHAPE[0]


def test_adni_thick_flair_on_t1_grid_and_sr_pair(tmp_path, capsys):
    raw = tmp_path / "raw"
    lab, ims = anatomy(seed=5)
    write_nii(raw / "S1" / "S1-T1.nii.gz", ims["T1"])
    # FLAIR acquired with 5 mm slices: every 5th slice, 5x the spacing along z (same physical extent)
    write_nii(raw / "S1" / "S1-FLAIR.nii.gz", np.ascontiguousarray(ims["PD"][::5]), spacing=(1.0, 1.0, 5.0))
    out = tmp_path / "h5"
    args = ["prepare", "--json", "--layout", "adni", "--input", str(raw), "--output", str(out), "--sr-thickness", "5"]
    assert main([*args, "--registration", "resample", "--test-fraction", "0"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["keys"] == ["t1", "flair", "t1_hr4sr", "t1_lr4sr"] and rep["train"] == 1
    with H5ArrayReader(out / "S1.h5") as h:
        t1, flair, hr, lr = (h[k][()] for k in ("t1", "flair", "t1_hr4sr", "t1_lr4sr"))
    assert flair.shape == t1.shape == SHAPE  # the LR volume is stored on the HR grid
    # nearest neighbour in physical space: HR slice i (z = i mm) takes thick slice round(i / 5) (z = 5k mm, so
    # the first slices are aligned); beyond the thick volume's extent (i >= 18) it is background
    thick = ims["PD"][::5]
    idx = np.rint(np.arange(SHAPE[0]) / 5).astype(int)
    on_grid = np.where((idx < len(thick))[:, None, None], thick[np.minimum(idx, len(thick) - 1)], 0)
    np.testing.assert_array_equal(flair, rescale_uint8(on_grid))
    assert flair[18:].max() == 0 and flair[15].max() > 0
    np.testing.assert_array_equal(hr, t1)
    for i in range(SHAPE[0]):
        np.testing.assert_array_equal(lr[i], t1[(i // 5) * 5])
    # the all_hr=False loader: all 5 targets of a thick slice share one input, neighbours at +-5 slices
    cfg = DataConfig(
        kind="h5", root=str(out), modalities=("t1_hr4sr",), sources=("t1_lr4sr",), thicknesses=(5,),
        all_hr=False, size=40, flip="none",
    )  # fmt: skip
    ds = SliceDataset(build_volumes(cfg, "train"), cfg)
    a = [ds[i]["A"] for i in range(5, 10)]
    assert all((x == a[0]).all() for x in a)
    np.testing.assert_allclose(a[0][1].numpy(), t1[5] / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(a[0][2].numpy(), t1[10] / 127.5 - 1, atol=1e-6)
    assert [round(float(ds[i]["delta"]), 3) for i in range(5, 10)] == [0.0, 0.2, 0.4, 0.6, 0.8]


@pytest.mark.parametrize("case", ["missing_modality", "empty", "no_input", "shape_mismatch", "unreadable"])
def test_bad_input_one_line_exit_2(case, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    if case == "missing_modality":
        ixi_folder(raw, n=2)
        victim = raw / "IXI001-Guys-1" / "IXI001-Guys-1-PD.nii.gz"
        victim.unlink()
        expect = str(victim)
    elif case == "empty":
        expect = "no subject files found"
    elif case == "no_input":
        raw = tmp_path / "nope"
        expect = str(raw)
    elif case == "shape_mismatch":
        ixi_folder(raw, n=1)
        victim = write_nii(raw / "IXI000-Guys-0" / "IXI000-Guys-0-T2.nii.gz", np.ones((5, 8, 8), np.float32))
        expect = str(victim)
    else:
        ixi_folder(raw, n=1)
        victim = raw / "IXI000-Guys-0" / "IXI000-Guys-0-T2.nii.gz"
        victim.write_bytes(b"not a nifti")
        expect = str(victim)
    args = ["prepare", "--json", "--input", str(raw), "--output", str(tmp_path / "h5")]
    if case == "shape_mismatch":
        args += ["--registration", "none"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    if case == "missing_modality":  # --skip-incomplete writes the complete subject and says what it skipped
        assert main([*args, "--skip-incomplete"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["subjects"] == 1 and list(rep["skipped"]) == ["IXI001-Guys-1"]

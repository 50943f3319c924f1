"""Data loading: the official remove_background, DICOM series inputs, .npy volumes (spec section 9)."""

import locale

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from drdm.config import build_network, load
from drdm.data import FolderImages, list_inputs, read_input, remove_background
from drdm.infer import augment_folder
from medsynth_core.io import MedicalIOError, write_image
from medsynth_core.phantoms import labelled_anatomy


def test_remove_background_official_rule():
    """The most frequent integer bin's value, where a pixel equals it exactly, becomes the min of the rest."""
    img = np.array([[0.0, 0.0, 0.0, 5.0], [7.0, 0.0, 3.0, 9.0]])
    out = remove_background(img)
    assert out.tolist() == [[3.0, 3.0, 3.0, 5.0], [7.0, 3.0, 3.0, 9.0]]
    assert img[0, 0] == 0.0  # the input is not modified
    # most values fall in bin [3, 4) but none equals 3 exactly: nothing is replaced (as in the official code)
    near = np.array([3.2, 3.4, 3.6, 0.5, 9.0])
    assert np.array_equal(remove_background(near), near)
    assert np.array_equal(remove_background(np.zeros((3, 3))), np.zeros((3, 3)))  # all background: unchanged


def test_folder_images_remove_background(tmp_path):
    """2D official order: resize, remove_background, min-max; the flag turns it off; preprocessed skips all."""
    img = np.zeros((32, 32), np.float32)
    img[8:24, 8:24] = 0.2
    img[12:20, 12:20] = 1.0
    write_image(img, tmp_path / "a" / "x.nii.gz")
    on = FolderImages(tmp_path / "a", ndims=2, size=32)[0][0]
    off = FolderImages(tmp_path / "a", ndims=2, size=32, rm_background=False)[0][0]
    assert float(off[10, 10]) == pytest.approx(0.2) and float(off[0, 0]) == 0.0
    assert float(on[10, 10]) == 0.0 and float(on[0, 0]) == 0.0 and float(on[16, 16]) == 1.0
    pre = FolderImages(tmp_path / "a", ndims=2, size=32, preprocessed=True)[0][0]
    assert torch.equal(pre, torch.from_numpy(img))
    with pytest.raises(MedicalIOError, match="preprocessed"):
        FolderImages(tmp_path / "a", ndims=2, size=64, preprocessed=True)


def _write_series(vol: np.ndarray, folder) -> None:
    """A small DICOM series (one file per slice) written with SimpleITK, ``vol`` is (i, j, k)."""
    folder.mkdir(parents=True)
    img = sitk.GetImageFromArray(np.transpose(vol, (2, 1, 0)).astype(np.int16))
    img.SetSpacing((1.25, 1.25, 8.0))
    uid = "1.2.826.0.1.3680043.2.1125.1.20250101.7"
    saved = locale.setlocale(locale.LC_ALL)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in (
            ("0008|0060", "MR"),
            ("0020|000d", uid + ".0"),
            ("0020|000e", uid + ".1"),
            ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0018|0050", "8.0"),
            ("0020|0032", f"0\\0\\{8.0 * k}"),
            ("0020|0013", str(k + 1)),
            ("0008|0018", f"{uid}.2.{k + 1}"),
        ):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture
def dicom_case(tmp_path):
    vol = np.stack([labelled_anatomy((32, 32), seed=i).image * 1000 for i in range(3)], axis=-1)
    lab = np.stack([labelled_anatomy((32, 32), seed=i).labels for i in range(3)], axis=-1)
    try:
        _write_series(vol, tmp_path / "img" / "patient1")
    except RuntimeError as exc:  # pragma: no cover - depends on the GDCM build
        pytest.skip(f"SimpleITK cannot write DICOM here: {exc}")
    write_image(lab.astype(np.int16), tmp_path / "lab" / "patient1_gt.nii.gz")
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    return tmp_path, vol


def test_dicom_series_inputs(dicom_case):
    """A DICOM series folder is one input everywhere NIfTI is read: training data and augment."""
    root, vol = dicom_case
    files = list_inputs(root / "img")
    assert [f.name for f in files] == ["patient1"]
    arr = read_input(files[0]).array
    assert arr.shape == (32, 32, 3) and np.array_equal(arr, vol.astype(np.int16).astype(np.float32))
    ds = FolderImages(root / "img", ndims=2, size=32)
    assert len(ds) == 3 and ds[0].shape == (1, 32, 32)
    cfg = load("demo", ["augment.aug_coe=1", "augment.reverse_from_start=true", "augment.start_noise_step=2"])
    torch.manual_seed(0)
    res = augment_folder(build_network(cfg).eval(), cfg, root / "img", root / "out", labels=root / "lab")
    assert "patient1_AugImg0000_NoiseStep0002.nii.gz" in res["written"]
    assert "patient1_AugImg0000_NoiseStep0002_GT.nii.gz" in res["written"]
    assert list_inputs(root / "img" / "patient1") == [root / "img" / "patient1"]  # the series folder itself


def test_npy_volumes(tmp_path):
    """The official LCT source format: .npy volumes."""
    vol = labelled_anatomy((16, 16, 16), seed=1).image
    (tmp_path / "v").mkdir()
    np.save(tmp_path / "v" / "a.npy", vol)
    ds = FolderImages(tmp_path / "v", ndims=3, size=16, rm_background=False)
    assert len(ds) == 1 and ds[0].shape == (1, 16, 16, 16)
    with pytest.raises(MedicalIOError, match="no image"):
        list_inputs(tmp_path / "v")  # .npy only for training folders

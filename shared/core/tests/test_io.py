"""Tests for medsynth_core.io (tiny arrays, real numeric checks)."""

from __future__ import annotations

import locale
import os
import pickle

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth_core import io as mio
from medsynth_core.io import (
    H5ArrayReader,
    LMDBArrayReader,
    LMDBArrayWriter,
    MedicalImage,
    MedicalIOError,
    from_sitk,
    list_images,
    minmax_to_range,
    percentile_clip,
    read_image,
    reorient_to_canonical,
    resample_to_reference,
    resample_to_shape,
    resample_to_spacing,
    to_sitk,
    window,
    write_h5,
    write_image,
    zscore,
)

RNG = np.random.default_rng(0)


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_3d() -> np.ndarray:
    """Rotated, anisotropic affine whose entries are exactly representable in float32 (NIfTI storage)."""
    a = np.eye(4)
    a[:3, :3] = _rot(0.3, -0.2, 0.5) @ np.diag([0.8, 1.3, 2.5])
    a[:3, 3] = [-12.5, 30.25, 7.0]
    return a.astype(np.float32).astype(np.float64)


def affine_2d() -> np.ndarray:
    """In-plane rotated, anisotropic 2D affine (x-y plane) with float32-exact entries."""
    a = np.eye(4)
    a[:3, :3] = _rot(0.0, 0.0, 0.4) @ np.diag([0.7, 1.9, 1.0])
    a[:3, 3] = [5.5, -3.25, 0.0]
    return a.astype(np.float32).astype(np.float64)


def world(affine: np.ndarray, idx) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(idx, dtype=np.float64) + affine[:3, 3]


# ---------------------------------------------------------------------------------------------- NIfTI


@pytest.mark.parametrize(
    "shape,affine",
    [((6, 5), affine_2d()), ((6, 5, 4), affine_3d()), ((5, 4, 3, 2), affine_3d())],
    ids=["2d", "3d", "4d"],
)
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_nifti_roundtrip_exact(tmp_path, shape, affine, ext):
    arr = RNG.normal(size=shape).astype(np.float32)
    path = write_image(arr, tmp_path / "sub" / f"img{ext}", affine=affine)
    assert path.exists()
    img = read_image(path, dtype=None)
    assert img.array.shape == shape and img.array.dtype == np.float32
    np.testing.assert_array_equal(img.array, arr)
    np.testing.assert_array_equal(img.affine, affine)
    assert img.ndim_spatial == min(len(shape), 3)
    hdr = nib.load(str(path)).header
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1
    np.testing.assert_allclose(img.spacing, np.linalg.norm(affine[:3, : img.ndim_spatial], axis=0))
    np.testing.assert_allclose(img.origin, affine[:3, 3])
    np.testing.assert_allclose(img.direction.T @ img.direction, np.eye(3), atol=1e-6)


def test_integer_and_bool_write(tmp_path):
    lab = np.arange(60, dtype=np.int64).reshape(5, 4, 3)
    read = read_image(write_image(lab, tmp_path / "lab.nii.gz"), dtype=None)
    np.testing.assert_array_equal(read.array, lab)
    mask = lab % 2 == 0
    np.testing.assert_array_equal(read_image(write_image(mask, tmp_path / "m.nii.gz")).array, mask)


def test_write_like_and_torch(tmp_path):
    torch = pytest.importorskip("torch")
    ref = MedicalImage(np.zeros((4, 3, 2), np.float32), affine_3d())
    t = torch.arange(24, dtype=torch.float32).reshape(4, 3, 2)
    img = read_image(write_image(t, tmp_path / "t.nii.gz", like=ref))
    np.testing.assert_array_equal(img.array, t.numpy())
    np.testing.assert_array_equal(img.affine, ref.affine)
    with pytest.raises(ValueError, match="spatial shape"):
        write_image(np.zeros((2, 2, 2)), tmp_path / "bad.nii.gz", like=ref)


# ------------------------------------------------------------------------------------- SimpleITK formats


@pytest.mark.parametrize("ext", [".mha", ".nrrd", ".mhd"])
@pytest.mark.parametrize("kind", ["2d", "3d", "4d"])
def test_nifti_to_sitk_formats(tmp_path, ext, kind):
    shape, affine = {
        "2d": ((6, 5), affine_2d()),
        "3d": ((6, 5, 4), affine_3d()),
        "4d": ((5, 4, 3, 2), affine_3d()),
    }[kind]
    arr = RNG.normal(size=shape).astype(np.float32)
    nii = read_image(write_image(arr, tmp_path / "a.nii.gz", affine=affine))
    out = write_image(nii, tmp_path / "out" / f"b{ext}")
    back = read_image(out)
    assert back.array.shape == shape
    np.testing.assert_allclose(back.array, arr, atol=1e-5)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    if ext == ".mhd":  # detached data file moved into place too
        assert any(p.suffix in (".raw", ".zraw") for p in out.parent.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")]


def test_from_sitk_geometry_convention():
    img = sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(5, 4, 3))  # (k, j, i)
    img.SetSpacing((0.5, 1.5, 3.0))
    img.SetOrigin((10.0, -4.0, 2.0))
    img.SetDirection(tuple(_rot(0.1, 0.2, -0.3).ravel()))
    m = from_sitk(img)
    assert m.array.shape == (3, 4, 5)
    for idx in [(0, 0, 0), (2, 1, 3), (1, 3, 4)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(idx))
        np.testing.assert_allclose(world(m.affine, idx), lps * [-1, -1, 1], atol=1e-10)
        assert m.array[idx] == img[idx]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(to_sitk(m)), sitk.GetArrayFromImage(img))
    assert np.allclose(to_sitk(m).GetDirection(), img.GetDirection())
    assert np.allclose(to_sitk(m).GetOrigin(), img.GetOrigin())


@pytest.mark.parametrize("shape,affine", [((6, 5, 4), affine_3d()), ((6, 5), affine_2d())], ids=["3d", "2d"])
def test_dhw_order(shape, affine):
    arr = RNG.normal(size=shape).astype(np.float32)
    img = MedicalImage(arr, affine)
    dhw = img.to_dhw()
    assert dhw.shape == shape[::-1]
    np.testing.assert_array_equal(dhw, sitk.GetArrayFromImage(to_sitk(img)))
    back = MedicalImage.from_dhw(dhw, affine)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_array_equal(back.affine, affine)
    rt = from_sitk(to_sitk(img))
    np.testing.assert_array_equal(rt.array, arr)
    np.testing.assert_allclose(rt.affine, affine, atol=1e-12)


def test_with_array():
    img = MedicalImage(np.zeros((4, 3, 2)), affine_3d())
    new = img.with_array(np.ones((4, 3, 2, 5)))
    assert new.array.shape == (4, 3, 2, 5) and new.ndim_spatial == 3
    np.testing.assert_array_equal(new.affine, img.affine)
    with pytest.raises(ValueError, match="spatial shape"):
        img.with_array(np.ones((3, 3, 2)))
    assert img.with_array(np.ones((3, 3, 2)), check_shape=False).array.shape == (3, 3, 2)


def _write_dicom_series(img: sitk.Image, folder) -> None:
    folder.mkdir()
    direction = img.GetDirection()
    uid = "1.2.826.0.1.3680043.2.1125.1.20240101.1"
    common = [
        ("0008|0060", "CT"),
        ("0008|0008", "DERIVED\\SECONDARY"),
        ("0020|000d", uid + ".0"),
        ("0020|000e", uid + ".1"),
        ("0020|0037", "\\".join(str(direction[i]) for i in (0, 3, 6, 1, 4, 7))),
        ("0018|0050", str(img.GetSpacing()[2])),
    ]
    saved_locale = locale.setlocale(locale.LC_ALL)  # GDCM's writer resets the process locale to "C",
    writer = sitk.ImageFileWriter()  # which would make later text I/O ASCII-only
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        for tag, value in common:
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{uid}.2.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    locale.setlocale(locale.LC_ALL, saved_locale)


def test_dicom_series_roundtrip(tmp_path):
    arr = RNG.integers(-1000, 2000, size=(6, 5, 4)).astype(np.int16)  # (i, j, k)
    ref = MedicalImage(arr, affine_3d())
    start = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_series(to_sitk(ref), tmp_path / "dcm")
    except RuntimeError as exc:  # pragma: no cover - depends on the GDCM build
        pytest.skip(f"SimpleITK cannot write DICOM here: {exc}")
    assert locale.setlocale(locale.LC_ALL) == start
    img = read_image(tmp_path / "dcm", dtype=None)
    assert locale.setlocale(locale.LC_ALL) == start  # reading DICOM leaves the locale alone
    assert img.array.shape == arr.shape
    np.testing.assert_array_equal(img.array.astype(np.int16), arr)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MedicalIOError, match="empty: folder holds no DICOM series"):
        read_image(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------- errors


def test_truncated_nifti(tmp_path):
    path = write_image(RNG.normal(size=(16, 16, 16)).astype(np.float32), tmp_path / "a.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MedicalIOError) as info:
        read_image(path)
    msg = str(info.value)
    assert str(path) in msg and "corrupt or truncated" in msg and "re-export" in msg


def _damaged_copies(tmp_path, image_cls):
    import gzip

    import nibabel as nib

    arr = RNG.normal(size=(12, 10, 8)).astype(np.float32)
    plain = tmp_path / "plain.nii"
    nib.save(image_cls(arr, np.eye(4)), str(plain))
    raw = plain.read_bytes()
    packed = gzip.compress(raw)
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    cases = {
        "no_trailer.nii.gz": (packed[:-8], "end-of-stream marker"),  # gzip cut after the last data block
        "flipped.nii.gz": (bytes(flipped), "corrupt or truncated"),  # CRC (or deflate) error
        "short.nii": (raw[:-500], f"declares {len(raw)} bytes"),  # plain file cut short
        "short_packed.nii.gz": (gzip.compress(raw[:-500]), f"holds {len(raw) - 500}"),  # cut, then gzipped
    }
    out = []
    for name, (data, needle) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        out.append((path, needle))
    return out


@pytest.mark.parametrize("nifti2", [False, True])
def test_damaged_nifti_refused_everywhere(tmp_path, nifti2):
    """Issue 18: nibabel reads a .nii.gz without its gzip trailer or with a flipped byte (it never reaches
    the CRC), SimpleITK zero-fills truncated files; both are refused, by read_image and by
    verify_file_complete (which packages reading through SimpleITK call first)."""
    import nibabel as nib
    import SimpleITK as sitk

    from medsynth_core.io import verify_file_complete

    for path, needle in _damaged_copies(tmp_path, nib.Nifti2Image if nifti2 else nib.Nifti1Image):
        for fn in (read_image, verify_file_complete):
            with pytest.raises(MedicalIOError) as info:
                fn(path)
            msg = str(info.value)
            assert msg.startswith(f"{path}: file is") and needle in msg and "re-download" in msg, msg
            assert "\n" not in msg
        if path.name != "flipped.nii.gz" and not nifti2:
            assert sitk.ReadImage(str(path)).GetSize() == (12, 10, 8)  # why the check exists: a silent read
    good = write_image(RNG.normal(size=(6, 5, 4)).astype(np.float32), tmp_path / "good.nii.gz")
    assert verify_file_complete(good) is None and read_image(good).array.shape == (6, 5, 4)


def test_damaged_gzip_sitk_format_refused(tmp_path):
    """Any file whose name ends in .gz gets the stream check before SimpleITK sees it."""
    import gzip

    path = tmp_path / "vol.mha.gz"
    path.write_bytes(gzip.compress(b"x" * 5000)[:-8])
    with pytest.raises(MedicalIOError, match="vol.mha.gz: file is corrupt or truncated"):
        read_image(path)


def test_corrupt_sitk_file(tmp_path):
    path = tmp_path / "junk.mha"
    path.write_bytes(b"this is not an image")
    with pytest.raises(MedicalIOError, match="junk.mha: file is unreadable or corrupt"):
        read_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(MedicalIOError, match="nope.nii.gz: file does not exist"):
        read_image(tmp_path / "nope.nii.gz")


def test_wrong_ndim(tmp_path):
    path = write_image(np.zeros((4, 5), np.float32), tmp_path / "a.nii.gz")
    with pytest.raises(MedicalIOError) as info:
        read_image(path, expect_ndim=(3, 4))
    msg = str(info.value)
    assert "a.nii.gz" in msg and "(4, 5)" in msg and "3D or 4D" in msg
    assert read_image(path, expect_ndim=2).array.shape == (4, 5)


def test_nan_detection(tmp_path):
    arr = np.zeros((4, 4, 3), np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 2, 1] = np.inf
    path = write_image(arr, tmp_path / "nan.nii.gz")
    with pytest.raises(MedicalIOError, match=r"nan.nii.gz: image contains 2 NaN/Inf voxel\(s\).*clean"):
        read_image(path)
    assert np.isnan(read_image(path, check_finite=False).array[0, 0, 0])


def test_list_images(tmp_path):
    with pytest.raises(MedicalIOError, match="folder does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(MedicalIOError) as info:
        list_images(tmp_path)
    assert str(tmp_path) in str(info.value) and "*.nii.gz" in str(info.value) and "*.mha" in str(info.value)
    for name in ["b.nii.gz", "a.nii", "c.mha", ".tmp-x.nii.gz"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.nii", "b.nii.gz", "c.mha"]


# --------------------------------------------------------------------------------------------- atomicity


@pytest.mark.parametrize("ext,target", [(".nii.gz", "nib"), (".mha", "sitk")])
def test_write_is_atomic(tmp_path, monkeypatch, ext, target):
    dest = tmp_path / f"img{ext}"
    old = np.full((4, 4, 3), 7.0, np.float32)
    write_image(old, dest)
    before = dest.read_bytes()

    def broken(_img, fname, *args, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    if target == "nib":
        monkeypatch.setattr(nib, "save", broken)
    else:
        monkeypatch.setattr(sitk, "WriteImage", broken)
    with pytest.raises(MedicalIOError, match="disk full"):
        write_image(np.zeros((4, 4, 3), np.float32), dest)
    assert dest.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [dest.name]
    monkeypatch.undo()
    np.testing.assert_array_equal(read_image(dest).array, old)


# ------------------------------------------------------------------------------------------- orientation


def test_reorient_to_canonical():
    las = np.diag([-1.5, 2.0, 3.0, 1.0])
    las[:3, 3] = [10.0, -5.0, 2.0]
    perm = np.zeros((4, 4))  # axes (i, j, k) along (-S, +R, -A)
    perm[:3, :3] = [[0, 1.2, 0], [0, 0, -0.9], [-2.0, 0, 0]]
    perm[:, 3] = [1.0, 2.0, 3.0, 1.0]
    for affine in (las, perm):
        arr = np.zeros((5, 4, 3), np.float32)
        arr[1, 2, 0] = 1.0
        img = MedicalImage(arr, affine)
        can = reorient_to_canonical(img)
        assert "".join(nib.aff2axcodes(can.affine)) == "RAS"
        assert np.all(np.diag(can.affine)[:3] > 0)
        new_idx = np.argwhere(can.array == 1.0)[0]
        np.testing.assert_allclose(world(can.affine, new_idx), world(affine, (1, 2, 0)))
        ref = nib.as_closest_canonical(nib.Nifti1Image(arr, affine))
        np.testing.assert_allclose(can.affine, ref.affine)
        np.testing.assert_array_equal(can.array, np.asanyarray(ref.dataobj))


def test_reorient_4d_and_2d():
    aff = np.diag([-1.0, 2.0, 1.0, 1.0])
    arr = RNG.normal(size=(3, 4, 2, 5))
    can = reorient_to_canonical(MedicalImage(arr, aff))
    np.testing.assert_array_equal(can.array, arr[::-1])
    a2 = np.zeros((4, 4))  # 2D axes along (-A, +R)
    a2[:3, :3] = [[0, 1.0, 0], [-2.0, 0, 0], [0, 0, 1.0]]
    a2[3, 3] = 1.0
    img2 = np.arange(12.0).reshape(3, 4)
    c2 = reorient_to_canonical(MedicalImage(img2, a2))
    assert c2.array.shape == (4, 3) and c2.ndim_spatial == 2
    assert c2.affine[0, 0] > 0 and c2.affine[1, 1] > 0
    for idx in np.ndindex(*c2.array.shape):
        old = np.linalg.solve(a2, np.r_[world(c2.affine, (*idx, 0)), 1.0])[:2]
        assert c2.array[idx] == img2[tuple(np.round(old).astype(int))]


# -------------------------------------------------------------------------------------------- resampling


def _ramp(affine: np.ndarray, shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float64)
    n = len(shape)
    w = idx @ affine[:3, :n].T + affine[:3, 3]
    return (0.5 * w[..., 0] - 0.25 * w[..., 1] + 0.1 * w[..., 2] + 3.0).astype(np.float32)


def _check_ramp(src: MedicalImage, out: MedicalImage) -> int:
    n = src.ndim_spatial
    expected = _ramp(out.affine, out.spatial_shape)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in out.spatial_shape], indexing="ij"), axis=-1)
    idx4 = np.zeros(idx.shape[:-1] + (4,))
    idx4[..., :n] = idx
    idx4[..., 3] = 1.0
    src_idx = (idx4 @ (np.linalg.inv(src.affine) @ out.affine).T)[..., :n]
    inside = np.all((src_idx >= -1e-6) & (src_idx <= np.asarray(src.spatial_shape) - 1 + 1e-6), axis=-1)
    assert inside.sum() > 0
    np.testing.assert_allclose(out.array[inside], expected[inside], atol=2e-4)
    return int(inside.sum())


@pytest.mark.parametrize("factor,new_shape", [(0.5, (16, 12, 10)), (2.0, (4, 3, 2))])
def test_resample_to_spacing_ramp(factor, new_shape):
    shape = (8, 6, 5)
    aff = affine_3d()
    img = MedicalImage(_ramp(aff, shape), aff)
    out = resample_to_spacing(img, np.asarray(img.spacing) * factor)
    assert out.spatial_shape == new_shape
    np.testing.assert_allclose(out.spacing, np.asarray(img.spacing) * factor)
    np.testing.assert_allclose(out.origin, img.origin)
    np.testing.assert_allclose(out.direction, img.direction, atol=1e-12)
    assert out.array.dtype == np.float32
    _check_ramp(img, out)


def test_resample_2d_and_4d():
    aff = affine_2d()
    img = MedicalImage(_ramp(aff, (6, 5)), aff)
    out = resample_to_spacing(img, [s / 2 for s in img.spacing])
    assert out.spatial_shape == (12, 10) and out.ndim_spatial == 2
    _check_ramp(img, out)
    cine = MedicalImage(np.stack([_ramp(affine_3d(), (4, 4, 3)) * t for t in (1, 2)], axis=-1), affine_3d())
    out4 = resample_to_spacing(cine, [s / 2 for s in cine.spacing])
    assert out4.array.shape == (8, 8, 6, 2)
    np.testing.assert_allclose(out4.array[..., 1], 2 * out4.array[..., 0], atol=1e-4)


@pytest.mark.parametrize("interp", ["nearest", "linear", "bspline"])
def test_resample_to_reference_identity(interp):
    arr = RNG.normal(size=(7, 6, 5)).astype(np.float32)
    img = MedicalImage(arr, affine_3d())
    out = resample_to_reference(img, img, interpolation=interp)
    np.testing.assert_array_equal(out.affine, img.affine)
    np.testing.assert_allclose(out.array, arr, atol=1e-5)
    labels = MedicalImage(RNG.integers(0, 4, size=(7, 6, 5)).astype(np.uint8), affine_3d())
    lab_out = resample_to_reference(labels, img, interpolation="nearest")
    assert lab_out.array.dtype == np.uint8
    np.testing.assert_array_equal(lab_out.array, labels.array)


def test_resample_to_reference_other_grid():
    aff = affine_3d()
    img = MedicalImage(_ramp(aff, (8, 7, 6)), aff)
    ref_aff = np.eye(4)
    ref_aff[:3, :3] = np.diag([1.1, 0.9, 1.3])
    ref_aff[:3, 3] = world(aff, (3.5, 3.0, 2.5)) - ref_aff[:3, :3] @ [2, 2, 2]
    ref = MedicalImage(np.zeros((5, 5, 5), np.float32), ref_aff)
    out = resample_to_reference(img, ref, default_value=-99.0)
    assert out.spatial_shape == (5, 5, 5)
    np.testing.assert_array_equal(out.affine, ref_aff)
    assert _check_ramp(img, out) > 10


@pytest.mark.parametrize("shape,new", [((8, 6, 5), (5, 9, 3)), ((6, 5), (9, 4))], ids=["3d", "2d"])
def test_resample_to_shape_keeps_extent(shape, new):
    aff = affine_3d() if len(shape) == 3 else affine_2d()
    img = MedicalImage(_ramp(aff, shape), aff)
    out = resample_to_shape(img, new)
    assert out.spatial_shape == new
    n = len(shape)
    np.testing.assert_allclose(np.asarray(out.spacing) * new, np.asarray(img.spacing) * shape)
    for corner in np.ndindex(*(2,) * n):
        c_old = [-0.5 + c * s for c, s in zip(corner, shape)] + [0.0] * (3 - n)
        c_new = [-0.5 + c * s for c, s in zip(corner, new)] + [0.0] * (3 - n)
        np.testing.assert_allclose(world(out.affine, c_new), world(aff, c_old), atol=1e-9)
    _check_ramp(img, out)


def test_resample_bad_interpolation():
    with pytest.raises(ValueError, match="interpolation"):
        resample_to_spacing(MedicalImage(np.zeros((3, 3, 3)), np.eye(4)), 1.0, interpolation="cubic")


# ------------------------------------------------------------------------------------------- normalisers


def test_minmax_to_range():
    x = RNG.normal(size=(5, 6)) * 100
    y = minmax_to_range(x)
    assert y.dtype == np.float32 and y.min() == -1.0 and y.max() == 1.0
    np.testing.assert_allclose(y, (x - x.min()) / (x.max() - x.min()) * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(minmax_to_range(np.full((3, 3), 5.0)), np.zeros((3, 3), np.float32))
    z = minmax_to_range(x, 0.0, 1.0)
    assert z.min() == 0.0 and z.max() == 1.0


def test_normalisers_torch():
    torch = pytest.importorskip("torch")
    t = torch.linspace(-3, 9, 13)
    y = minmax_to_range(t)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    assert isinstance(zscore(t), torch.Tensor)


def test_percentile_clip():
    x = np.arange(1000, dtype=np.float64).reshape(10, 100)
    y = percentile_clip(x, 1.0, 99.0)
    lo, hi = np.percentile(x, [1.0, 99.0])
    assert y.dtype == np.float32 and y.min() == 0.0 and y.max() == 1.0
    assert np.sum(y == 0.0) == np.sum(x <= lo) and np.sum(y == 1.0) == np.sum(x >= hi)
    raw = percentile_clip(x, 1.0, 99.0, rescale_to=None)
    np.testing.assert_allclose([raw.min(), raw.max()], [lo, hi], rtol=1e-6)
    mask = x < 500
    m = percentile_clip(x, 0.0, 100.0, mask=mask, rescale_to=(-1.0, 1.0))
    assert m[0, 0] == -1.0 and np.all(m[~mask] == 1.0)
    np.testing.assert_allclose(m[4, 99], 1.0)


def test_zscore():
    x = RNG.normal(5.0, 3.0, size=(20, 30))
    y = zscore(x)
    assert y.dtype == np.float32
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std()) - 1.0) < 1e-5
    mask = np.zeros_like(x, dtype=bool)
    mask[:10] = True
    ym = zscore(x, mask=mask)
    assert abs(float(ym[mask].mean())) < 1e-5 and abs(float(ym[mask].std()) - 1.0) < 1e-5
    np.testing.assert_allclose(ym, (x - x[mask].mean()) / (x[mask].std() + 1e-8), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mask selects no voxel"):
        zscore(x, mask=np.zeros_like(mask))


def test_window():
    hu = np.array([-2000.0, -160.0, 40.0, 240.0, 3000.0])
    y = window(hu, center=40.0, width=400.0)
    np.testing.assert_allclose(y, [-1.0, -1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(window(hu, 40.0, 400.0, out_range=(0.0, 1.0)), [0.0, 0.0, 0.5, 1.0, 1.0])


# ------------------------------------------------------------------------------------------ HDF5 / LMDB


def test_h5_roundtrip(tmp_path):
    arrays = {
        "img": RNG.normal(size=(4, 5, 6)).astype(np.float32),
        "grp/lab": np.arange(20, dtype=np.int16).reshape(4, 5),
        "scalar": np.array(3.5),
    }
    path = write_h5(tmp_path / "d" / "data.h5", arrays, attrs={"subject": "s01", "spacing": [1.0, 2.0]})
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.h5"]
    reader = H5ArrayReader(path)
    assert reader._file is None  # lazy: nothing opened in __init__
    assert reader.keys() == ["grp/lab", "img", "scalar"]
    for k, v in arrays.items():
        np.testing.assert_array_equal(reader[k], v)
        assert reader[k].dtype == v.dtype
    assert reader.shape("img") == (4, 5, 6)
    np.testing.assert_array_equal(reader.read_slice("img", (slice(None), 2)), arrays["img"][:, 2])
    np.testing.assert_array_equal(reader.read_slice("img", 1), arrays["img"][1])
    assert reader.attrs["subject"] == "s01"
    np.testing.assert_array_equal(reader.attrs["spacing"], [1.0, 2.0])
    clone = pickle.loads(pickle.dumps(reader))  # what a spawned DataLoader worker gets
    np.testing.assert_array_equal(clone["grp/lab"], arrays["grp/lab"])
    with pytest.raises(KeyError, match="missing"):
        reader["missing"]
    reader._pid = -1  # simulate a forked process: must reopen instead of reusing the handle
    np.testing.assert_array_equal(reader["img"], arrays["img"])
    assert reader._pid == os.getpid()
    reader.close()
    with H5ArrayReader(path) as r2:
        assert len(r2) == 3
    with pytest.raises(MedicalIOError, match="HDF5 file does not exist"):
        H5ArrayReader(tmp_path / "none.h5")


def test_lmdb_roundtrip(tmp_path):
    path = tmp_path / "db"
    a = RNG.normal(size=(3, 4, 5)).astype(np.float32)
    b = np.arange(12, dtype=np.int64).reshape(3, 4)
    with LMDBArrayWriter(path, map_size=2**24) as w:
        w.put("a", a)
        w.put("b", b)
        w.commit()
        w.put("c16", a, dtype=np.float16)
    r = LMDBArrayReader(path)
    assert r._env is None
    assert len(r) == 3 and r.keys() == ["a", "b", "c16"]
    np.testing.assert_array_equal(r["a"], a)
    np.testing.assert_array_equal(r["b"], b)
    assert r["c16"].dtype == np.float16
    np.testing.assert_allclose(r["c16"], a, rtol=1e-3, atol=1e-3)
    with pytest.raises(KeyError):
        r["zz"]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(r))["a"], a)
    r.close()

    path16 = tmp_path / "db16"
    with LMDBArrayWriter(path16, map_size=2**24, dtype=np.float16) as w:
        w.put("x", a)
        w.put("lab", b)  # integer arrays are not cast
    r16 = LMDBArrayReader(path16, dtype=np.float32)
    assert r16["x"].dtype == np.float32
    np.testing.assert_array_equal(r16["x"], a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(LMDBArrayReader(path16)["lab"], b)
    with pytest.raises(MedicalIOError, match="LMDB database does not exist"):
        LMDBArrayReader(tmp_path / "nodb")


def test_module_is_generic():
    import inspect

    src = inspect.getsource(mio).lower()
    for word in ("fda", "drdm", "mgdcr", "coal", "meddiffusion"):
        assert word not in src

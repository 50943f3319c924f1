"""Reading and writing images (NIfTI via nibabel, DICOM series and other formats via SimpleITK; atomic
writes) and listing the images of a folder."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medsynth_core.atomic import atomic_output
from medsynth_core.io.image import (
    DEFAULT_IMAGE_PATTERNS,
    MedicalImage,
    MedicalIOError,
    _as_numpy,
    _err,
    _short,
    from_sitk,
    to_sitk,
)

# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


_CHUNK = 1 << 22
# NIfTI datatype code -> bits per voxel (NIfTI-1/2 standard table)
_NIFTI_BITPIX = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32, 1024: 64,
                 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}


def _nifti_expected_bytes(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs (vox_offset + voxels x bitpix/8) from its header, or None if the
    header is not recognisable (then the reader's own checks apply)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", head[40:56])
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:  # NIfTI-2
            dims = struct.unpack(endian + "8q", head[16:80])
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or datatype not in _NIFTI_BITPIX:
        return None
    voxels = 1
    for d in dims[1 : ndim + 1]:
        voxels *= max(int(d), 1)
    return offset + voxels * _NIFTI_BITPIX[datatype] // 8


def verify_file_complete(path: str | os.PathLike) -> None:
    """Refuse a damaged file before a reader fills the gap with zeros (SimpleITK does, silently).

    A gzip file is decompressed to its end in chunks, which checks the stream's end marker, CRC-32 and
    length; a NIfTI file (plain or gzip) must hold at least the ``vox_offset + voxels x bitpix/8`` bytes
    its header declares. Raises :class:`MedicalIOError` naming the file; returns None when complete.
    """
    path = Path(path)
    fix = "the file is damaged (an interrupted copy or download?): re-export or re-download it"
    head = b""
    total = 0
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    if len(head) < 540:
                        head += chunk[: 540 - len(head)]
                    total += len(chunk)
        else:
            total = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(540)
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as exc:
        raise _err(path, f"file is corrupt or truncated ({_short(exc)})", fix) from exc
    if _is_nifti(path):
        need = _nifti_expected_bytes(head)
        if need is not None and total < need:
            raise _err(
                path,
                f"file is truncated: its NIfTI header declares {need} bytes of header and voxels, "
                f"the file holds {total}",
                fix,
            )


def _read_nifti(path: Path) -> MedicalImage:
    verify_file_complete(path)
    try:
        img = nib.load(str(path))
        arr = np.asanyarray(img.dataobj)  # force the read so truncation/corruption surfaces here
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel/gzip/zlib raise a variety of types
        raise _err(
            path,
            f"file is corrupt or truncated (gzip/NIfTI read failed: {_short(exc)})",
            "re-export or re-download it",
        ) from exc
    if not 2 <= arr.ndim <= 4:
        raise _err(
            path,
            f"NIfTI image has {arr.ndim} axes (shape {arr.shape}); only 2D, 3D and 4D images are supported",
            "store it as a 2D/3D image, or split extra axes into separate files",
        )
    return MedicalImage(arr, affine, 2 if arr.ndim == 2 else 3)


def _read_dicom_dir(path: Path) -> MedicalImage:
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)) or ()
    except Exception as exc:
        raise _err(
            path, f"could not scan folder for DICOM series ({exc})", "check the folder contents"
        ) from exc
    if not series_ids:
        raise _err(
            path,
            "folder holds no DICOM series",
            "pass a folder of DICOM slices (.dcm) or a single image file",
        )
    files_per_series = {
        sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), sid) for sid in sorted(series_ids)
    }
    # several series: take the one with the most slices (ties broken by series UID)
    sid = max(sorted(files_per_series), key=lambda s: len(files_per_series[s]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[sid])
    try:
        return from_sitk(reader.Execute())
    except Exception as exc:
        raise _err(
            path,
            f"DICOM series {sid} could not be read ({_short(exc)})",
            "check that the slices are complete and belong to one series",
        ) from exc


def _read_sitk(path: Path) -> MedicalImage:
    verify_file_complete(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise _err(
            path,
            f"file is unreadable or corrupt (SimpleITK {_short(exc)})",
            "check it is a supported image (NIfTI, NRRD, MHA/MHD, DICOM, ...) and re-export it if damaged",
        ) from exc
    try:
        return from_sitk(img)
    except ValueError as exc:
        raise _err(path, str(exc), "convert it to a 2D, 3D or 4D scalar image") from exc


def read_image(
    path: str | os.PathLike,
    dtype: Any = np.float32,
    expect_ndim: int | Sequence[int] | None = None,
    check_finite: bool = True,
) -> MedicalImage:
    """Read a medical image into a :class:`MedicalImage` (array in disk order, RAS+ affine).

    ``.nii``/``.nii.gz`` are read with nibabel (scaling applied), a directory as a DICOM series, any
    other file with SimpleITK (NRRD, MHA/MHD, single DICOM, ...). ``dtype=None`` keeps the stored type.
    ``expect_ndim`` (int or tuple) checks the number of array axes. ``check_finite`` rejects NaN/Inf.
    """
    path = Path(path)
    if not path.exists():
        raise _err(path, "file does not exist", "check the path and the working directory")
    if path.is_dir():
        image = _read_dicom_dir(path)
    elif _is_nifti(path):
        image = _read_nifti(path)
    else:
        image = _read_sitk(path)

    if expect_ndim is not None:
        allowed = (expect_ndim,) if isinstance(expect_ndim, int) else tuple(expect_ndim)
        if image.array.ndim not in allowed:
            want = " or ".join(f"{d}D" for d in allowed)
            raise _err(
                path,
                f"image has shape {image.array.shape} ({image.array.ndim}D) but {want} was expected",
                "pass a file of that dimensionality (for example one volume, not a time series or a single slice)",
            )
    if dtype is not None and image.array.dtype != np.dtype(dtype):
        image.array = image.array.astype(dtype)
    if check_finite and np.issubdtype(image.array.dtype, np.inexact):
        bad = int(image.array.size - np.count_nonzero(np.isfinite(image.array)))
        if bad:
            raise _err(
                path,
                f"image contains {bad} NaN/Inf voxel(s) out of {image.array.size}",
                "clean the file (e.g. replace them with numpy.nan_to_num and re-save it)",
            )
    return image


# --------------------------------------------------------------------------------------------------
# Writing (atomic)
# --------------------------------------------------------------------------------------------------


def _nifti_array(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


def write_image(
    image_or_array: MedicalImage | np.ndarray | Any,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    like: MedicalImage | None = None,
    *,
    compress: bool = True,
) -> Path:
    """Write an image atomically; the format follows the extension. Returns the path written.

    An array (numpy or torch) must be in disk order ``(i, j, k[, t])``; its affine is ``affine``, else
    ``like.affine`` (spatial shape must then match ``like``), else identity. ``affine`` also overrides a
    :class:`MedicalImage`'s own. ``.nii``/``.nii.gz`` are written with nibabel (qform and sform set from
    the affine with code 1; NIfTI stores them as float32); every other extension with SimpleITK
    (``compress`` enables its compression). Parent folders are created.
    """
    path = Path(path)
    if isinstance(image_or_array, MedicalImage):
        image = image_or_array
        if affine is not None:
            image = MedicalImage(image.array, affine, image.n_spatial)
    else:
        arr = _as_numpy(image_or_array)
        if affine is not None:
            image = MedicalImage(arr, affine)
        elif like is not None:
            image = like.with_array(arr)
        else:
            image = MedicalImage(arr, np.eye(4))

    try:
        with atomic_output(path) as tmp:
            if _is_nifti(path):
                arr = _nifti_array(image.array)
                nii = nib.Nifti1Image(arr, image.affine, dtype=arr.dtype)
                nii.set_qform(image.affine, code=1)
                nii.set_sform(image.affine, code=1)
                nii.header.set_xyzt_units("mm", "sec")
                nib.save(nii, str(tmp))
            else:
                sitk.WriteImage(to_sitk(image), str(tmp), compress)
    except MedicalIOError:
        raise
    except Exception as exc:
        raise _err(
            path,
            f"writing failed ({_short(exc)}); any previous file there is unchanged",
            "check the extension (.nii.gz, .nii, .nrrd, .mha, .mhd), free disk space and permissions",
        ) from exc
    return path


# --------------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike, patterns: Sequence[str] = DEFAULT_IMAGE_PATTERNS) -> list[Path]:
    """Sorted image files directly inside ``folder`` matching ``patterns`` (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "folder does not exist"
        raise _err(folder, problem, "check the data path (it must be a folder of image files)")
    found = {p for pat in patterns for p in folder.glob(pat) if p.is_file() and not p.name.startswith(".")}
    if not found:
        raise _err(
            folder,
            f"folder holds no image file (looked for {', '.join(patterns)})",
            "put the images there, point to the right folder or pass other patterns",
        )
    return sorted(found)

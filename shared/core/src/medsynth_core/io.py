"""Medical image IO: NIfTI, NRRD/MHA/MHD, DICOM series, HDF5 and LMDB array stores.

Conventions
-----------
* :class:`MedicalImage` keeps the voxel array in **disk index order** ``(i, j, k[, t])`` exactly as
  nibabel returns it (2D images are ``(i, j)``), together with a 4x4 float64 **RAS+** affine that maps
  voxel indices to world millimetres (the nibabel convention; 2D images also carry a 4x4 affine).
* :meth:`MedicalImage.to_dhw` gives the reversed axis order ``(k, j, i)`` used by torch and by
  ``SimpleITK.GetArrayFromImage``.
* SimpleITK geometry is LPS: ``world_LPS = origin + Direction @ diag(spacing) @ index`` and
  ``RAS = diag(-1, -1, 1) @ LPS``; conversions in both directions live in :func:`to_sitk` and
  :func:`from_sitk`.
* Every file written by this module is written atomically (temporary file in the destination folder,
  then :func:`os.replace`), so a crash never leaves a half-written file at the destination.
* Every error raised for a bad file is a :class:`MedicalIOError` naming the file, what is wrong and how
  to fix it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel import orientations as nio

from .atomic import atomic_output

__all__ = [
    "MedicalIOError",
    "MedicalImage",
    "read_image",
    "write_image",
    "to_sitk",
    "from_sitk",
    "reorient_to_canonical",
    "resample_to_spacing",
    "resample_to_shape",
    "resample_to_reference",
    "minmax_to_range",
    "percentile_clip",
    "zscore",
    "window",
    "list_images",
    "DEFAULT_IMAGE_PATTERNS",
    "write_h5",
    "H5ArrayReader",
    "LMDBArrayWriter",
    "LMDBArrayReader",
]

DEFAULT_IMAGE_PATTERNS: tuple[str, ...] = ("*.nii.gz", "*.nii", "*.nrrd", "*.mha", "*.mhd")

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


class MedicalIOError(ValueError):
    """A medical file could not be read or written; the message names the file and the fix."""


def _short(exc: BaseException) -> str:
    """``Type: last line of message`` (SimpleITK messages span several lines)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}".rstrip(": ")


def _err(path: str | os.PathLike, problem: str, fix: str) -> MedicalIOError:
    return MedicalIOError(f"{os.fspath(path)}: {problem}; {fix}")


# --------------------------------------------------------------------------------------------------
# Image container
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class MedicalImage:
    """A voxel array in disk index order ``(i, j, k[, t])`` plus its 4x4 RAS+ affine.

    ``n_spatial`` is the number of spatial axes (2 or 3). ``None`` infers ``min(array.ndim, 3)``, so a
    3-axis array is a volume; pass ``n_spatial=2`` for a 2D image with a trailing channel/time axis.
    Axes after the spatial ones (at most one) are time or channels.
    """

    array: np.ndarray
    affine: np.ndarray
    n_spatial: int | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4 (got shape {affine.shape}); pass a nibabel-style affine")
        if not np.all(np.isfinite(affine)):
            raise ValueError("affine contains NaN/Inf; fix the image header or pass a valid affine")
        self.affine = affine
        if self.n_spatial is None:
            self.n_spatial = min(self.array.ndim, 3)
        if self.n_spatial not in (2, 3):
            raise ValueError(f"n_spatial must be 2 or 3 (got {self.n_spatial})")
        extra = self.array.ndim - self.n_spatial
        if extra not in (0, 1):
            raise ValueError(
                f"array of shape {self.array.shape} does not fit n_spatial={self.n_spatial}: expected "
                f"{self.n_spatial} spatial axes plus at most one time/channel axis"
            )

    # ---- geometry ---------------------------------------------------------------------------------
    @property
    def ndim_spatial(self) -> int:
        """Number of spatial axes (2 or 3); a further trailing axis is time or channels."""
        return int(self.n_spatial)  # type: ignore[arg-type]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the spatial axes ``(i, j[, k])``."""
        return tuple(int(s) for s in self.array.shape[: self.ndim_spatial])

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each spatial array axis (norms of the affine columns)."""
        cols = self.affine[:3, : self.ndim_spatial]
        return tuple(float(v) for v in np.linalg.norm(cols, axis=0))

    @property
    def origin(self) -> tuple[float, float, float]:
        """World RAS position (mm) of the centre of voxel ``(0, 0, 0)``."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit RAS directions of the array axes."""
        cols = self.affine[:3, :3].copy()
        norms = np.linalg.norm(cols, axis=0)
        for c in range(3):
            if norms[c] > 0:
                cols[:, c] /= norms[c]
        if norms[2] == 0:  # degenerate third column (2D): complete a right-handed frame
            cols[:, 2] = np.cross(cols[:, 0], cols[:, 1])
        return cols

    # ---- axis order ---------------------------------------------------------------------------------
    def to_dhw(self) -> np.ndarray:
        """Array with all axes reversed: ``(k, j, i)`` for 3D, ``(j, i)`` for 2D, ``(t, k, j, i)`` for 4D.

        This equals ``SimpleITK.GetArrayFromImage`` order and, for 4D, torch channel-first order.
        """
        return np.transpose(self.array)

    @classmethod
    def from_dhw(cls, array: np.ndarray, affine: np.ndarray, n_spatial: int | None = None) -> MedicalImage:
        """Inverse of :meth:`to_dhw`: build an image from a ``(k, j, i)``-ordered array."""
        return cls(np.transpose(np.asarray(array)), affine, n_spatial)

    def with_array(self, new_array: Any, check_shape: bool = True) -> MedicalImage:
        """Same geometry, new voxel data (spatial shape must match unless ``check_shape=False``)."""
        arr = _as_numpy(new_array)
        if check_shape and tuple(arr.shape[: self.ndim_spatial]) != self.spatial_shape:
            raise ValueError(
                f"new array has shape {arr.shape} but the image's spatial shape is {self.spatial_shape}; "
                "resample it first or pass check_shape=False"
            )
        n_spatial = self.ndim_spatial if arr.ndim in (self.ndim_spatial, self.ndim_spatial + 1) else None
        return MedicalImage(arr, self.affine.copy(), n_spatial)


def _as_numpy(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "detach")


# --------------------------------------------------------------------------------------------------
# SimpleITK <-> MedicalImage
# --------------------------------------------------------------------------------------------------


def _affine_from_lps(direction: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """4x4 RAS affine from SimpleITK (LPS) geometry of 2 or 3 spatial dims."""
    n = len(spacing)
    lps = np.eye(4)
    lps[:n, :n] = np.asarray(direction, dtype=np.float64).reshape(n, n) * np.asarray(
        spacing, dtype=np.float64
    )
    lps[:n, 3] = np.asarray(origin, dtype=np.float64)
    ras = np.eye(4)
    ras[:3, :3] = _LPS_TO_RAS
    return ras @ lps


def _lps_geometry(affine: np.ndarray, n: int) -> tuple[list[float], list[float], list[float]]:
    """(spacing, flat direction, origin) of SimpleITK LPS geometry for ``n`` spatial dims.

    For 2D only the in-plane (x, y) part of the affine can be represented by SimpleITK.
    """
    lps = np.eye(4)
    lps[:3, :3] = _LPS_TO_RAS
    lps = lps @ affine
    spacing = np.linalg.norm(affine[:3, :n], axis=0)
    if np.any(spacing == 0):
        raise ValueError(f"affine has a zero-length axis (spacing {spacing}); fix the image geometry")
    direction = lps[:n, :n] / spacing
    if n == 2:  # project the plane onto x-y; renormalise columns
        direction = direction / np.linalg.norm(direction, axis=0)
    if abs(np.linalg.det(direction)) < 1e-6:
        raise ValueError("affine direction is singular in the image plane; SimpleITK cannot represent it")
    return [float(v) for v in spacing], [float(v) for v in direction.ravel()], [float(v) for v in lps[:n, 3]]


def _sitk_compatible(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


def to_sitk(image: MedicalImage) -> sitk.Image:
    """Convert to a SimpleITK image with LPS geometry.

    3D images become 3D images, 2D images 2D images, a 3D image with a trailing time/channel axis a 4D
    image (identity along the 4th axis), a 2D image with a trailing channel axis a 2D vector image.
    bool/float16 data are stored as uint8/float32.
    """
    n = image.ndim_spatial
    arr = _sitk_compatible(image.array)
    spacing, direction, origin = _lps_geometry(image.affine, n)
    if arr.ndim == n:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)), isVector=False)
    elif n == 2:
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(1, 0, 2)), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr)), isVector=False)
        d4 = np.eye(4)
        d4[:3, :3] = np.asarray(direction).reshape(3, 3)
        spacing, direction, origin = spacing + [1.0], [float(v) for v in d4.ravel()], origin + [0.0]
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return img


def from_sitk(sitk_image: sitk.Image) -> MedicalImage:
    """Convert a SimpleITK image (2D, 3D, 4D or vector-valued) to a :class:`MedicalImage`."""
    dim = sitk_image.GetDimension()
    if dim not in (2, 3, 4):
        raise ValueError(f"SimpleITK image of dimension {dim} is not supported (need 2, 3 or 4)")
    n = min(dim, 3)
    arr = sitk.GetArrayFromImage(sitk_image)
    if sitk_image.GetNumberOfComponentsPerPixel() > 1:
        if dim == 4:
            raise ValueError("4D vector-valued SimpleITK images are not supported")
        spatial = tuple(range(dim))[::-1]
        arr = arr.transpose(*spatial, dim)
        n = dim
    else:
        arr = np.transpose(arr)
    direction = np.asarray(sitk_image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    affine = _affine_from_lps(direction, sitk_image.GetSpacing()[:n], sitk_image.GetOrigin()[:n])
    return MedicalImage(np.ascontiguousarray(arr), affine, n)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _read_nifti(path: Path) -> MedicalImage:
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
            "point read_image at a folder of DICOM slices (.dcm) or at a single image file",
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
                "pass the right file or adjust expect_ndim",
            )
    if dtype is not None and image.array.dtype != np.dtype(dtype):
        image.array = image.array.astype(dtype)
    if check_finite and np.issubdtype(image.array.dtype, np.inexact):
        bad = int(image.array.size - np.count_nonzero(np.isfinite(image.array)))
        if bad:
            raise _err(
                path,
                f"image contains {bad} NaN/Inf voxel(s) out of {image.array.size}",
                "clean the file (e.g. replace them with np.nan_to_num and re-save) or pass check_finite=False",
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
# Orientation and resampling
# --------------------------------------------------------------------------------------------------


def reorient_to_canonical(image: MedicalImage) -> MedicalImage:
    """Permute/flip the array axes so they point as closely as possible along R, A, S.

    Same semantics as ``nibabel.as_closest_canonical`` (no interpolation, world geometry unchanged). For
    2D images the two axes are ordered by their closest world axis and flipped to point positively.
    """
    n = image.ndim_spatial
    cols = list(range(n)) + [3]
    ornt = nio.io_orientation(image.affine[:, cols])
    if np.any(np.isnan(ornt)):
        raise ValueError("affine is degenerate; cannot determine the image orientation")
    ornt[:, 0] = np.argsort(np.argsort(ornt[:, 0]))  # rank world axes (needed for 2D planes)
    if np.array_equal(ornt, np.column_stack([np.arange(n), np.ones(n)])):
        return MedicalImage(image.array.copy(), image.affine.copy(), n)
    arr = nio.apply_orientation(image.array, ornt)
    vox = nio.inv_ornt_aff(ornt, image.spatial_shape)  # new index -> old index, (n+1)x(n+1)
    vox4 = np.eye(4)
    vox4[np.ix_(cols, cols)] = vox
    return MedicalImage(np.ascontiguousarray(arr), image.affine @ vox4, n)


def _resample_grid(
    image: MedicalImage,
    out_shape: Sequence[int],
    out_affine: np.ndarray,
    interpolation: str,
    default_value: float,
) -> MedicalImage:
    """Resample ``image`` onto the grid (``out_shape``, ``out_affine``) with SimpleITK, frame by frame."""
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)} (got {interpolation!r})")
    n = image.ndim_spatial
    src = image.array
    if (interpolation != "nearest" and not np.issubdtype(src.dtype, np.floating)) or src.dtype == np.float16:
        src = src.astype(np.float32)
    spacing, direction, origin = _lps_geometry(out_affine, n)
    size = [int(s) for s in out_shape]

    def one(frame: np.ndarray) -> np.ndarray:
        moving = to_sitk(MedicalImage(frame, image.affine, n))
        f = sitk.ResampleImageFilter()
        f.SetSize(size)
        f.SetOutputSpacing(spacing)
        f.SetOutputDirection(direction)
        f.SetOutputOrigin(origin)
        f.SetTransform(sitk.Transform())
        f.SetInterpolator(_INTERPOLATORS[interpolation])
        f.SetDefaultPixelValue(float(default_value))
        f.SetOutputPixelType(moving.GetPixelID())
        return np.transpose(sitk.GetArrayFromImage(f.Execute(moving)))

    if src.ndim == n:
        out = one(src)
    else:
        out = np.stack([one(src[..., t]) for t in range(src.shape[-1])], axis=-1)
    if out.dtype != src.dtype:
        out = out.astype(src.dtype)
    return MedicalImage(np.ascontiguousarray(out), out_affine, n)


def _voxel_map(scale: np.ndarray, shift: np.ndarray, n: int) -> np.ndarray:
    """4x4 map new index -> old index: ``old = scale * new + shift`` on the first ``n`` axes."""
    m = np.eye(4)
    m[range(n), range(n)] = scale
    m[:n, 3] = shift
    return m


def resample_to_spacing(
    image: MedicalImage,
    spacing: float | Sequence[float],
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> MedicalImage:
    """Resample to a new voxel size (mm) keeping origin and direction.

    New size is ``round(old_size * old_spacing / new_spacing)`` (at least 1). Non-nearest interpolation
    returns floating data.
    """
    n = image.ndim_spatial
    new_sp = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (n,))
    if np.any(new_sp <= 0):
        raise ValueError(f"spacing must be positive (got {tuple(new_sp)})")
    old_sp = np.asarray(image.spacing)
    old_size = np.asarray(image.spatial_shape)
    new_size = np.maximum(np.round(old_size * old_sp / new_sp), 1).astype(int)
    out_affine = image.affine @ _voxel_map(new_sp / old_sp, np.zeros(n), n)
    return _resample_grid(image, new_size, out_affine, interpolation, default_value)


def resample_to_shape(
    image: MedicalImage,
    shape: Sequence[int],
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> MedicalImage:
    """Resample to a new spatial shape preserving the physical field of view.

    The spacing becomes ``old_spacing * old_size / new_size`` and the grid is re-centred so the outer
    voxel edges stay at the same world positions.
    """
    n = image.ndim_spatial
    new_size = np.asarray([int(s) for s in shape])
    if new_size.shape != (n,) or np.any(new_size < 1):
        raise ValueError(f"shape must be {n} positive ints (got {tuple(shape)})")
    scale = np.asarray(image.spatial_shape) / new_size
    out_affine = image.affine @ _voxel_map(scale, 0.5 * scale - 0.5, n)
    return _resample_grid(image, new_size, out_affine, interpolation, default_value)


def resample_to_reference(
    image: MedicalImage,
    reference: MedicalImage,
    interpolation: str = "linear",
    default_value: float = 0.0,
) -> MedicalImage:
    """Resample ``image`` onto ``reference``'s grid (same spatial shape and affine as ``reference``)."""
    if reference.ndim_spatial != image.ndim_spatial:
        raise ValueError(
            f"image is {image.ndim_spatial}D but reference is {reference.ndim_spatial}D; both must match"
        )
    return _resample_grid(
        image, reference.spatial_shape, reference.affine.copy(), interpolation, default_value
    )


# --------------------------------------------------------------------------------------------------
# Intensity normalisation
# --------------------------------------------------------------------------------------------------


def _norm_in(x: Any) -> tuple[np.ndarray, Any]:
    if _is_torch(x):
        return x.detach().cpu().numpy().astype(np.float32), x
    return np.asarray(x, dtype=np.float32), None


def _norm_out(y: np.ndarray, like: Any) -> Any:
    y = np.asarray(y, dtype=np.float32)
    if like is None:
        return y
    import torch

    return torch.from_numpy(np.ascontiguousarray(y)).to(device=like.device)


def _masked(x: np.ndarray, mask: Any) -> np.ndarray:
    if mask is None:
        return x.ravel()
    m = _as_numpy(mask).astype(bool)
    if m.shape != x.shape:
        raise ValueError(f"mask shape {m.shape} does not match data shape {x.shape}")
    if not m.any():
        raise ValueError("mask selects no voxel; pass a non-empty mask or mask=None")
    return x[m]


def _rescale(x: np.ndarray, vmin: float, vmax: float, lo: float, hi: float) -> np.ndarray:
    if vmax - vmin <= 0:
        return np.full_like(x, 0.5 * (lo + hi), dtype=np.float32)
    y = (x - vmin) / (vmax - vmin) * (hi - lo) + lo
    return np.clip(y, min(lo, hi), max(lo, hi))


def minmax_to_range(x: Any, lo: float = -1.0, hi: float = 1.0) -> Any:
    """Linearly map ``[min(x), max(x)]`` to ``[lo, hi]`` (float32).

    A constant input maps to the midpoint ``(lo + hi) / 2``, i.e. all zeros for the default ``[-1, 1]``.
    """
    a, like = _norm_in(x)
    if a.size == 0:
        return _norm_out(a, like)
    return _norm_out(_rescale(a, float(a.min()), float(a.max()), lo, hi), like)


def percentile_clip(
    x: Any,
    lower: float = 0.5,
    upper: float = 99.5,
    mask: Any = None,
    rescale_to: tuple[float, float] | None = (0.0, 1.0),
) -> Any:
    """Clip to the ``[lower, upper]`` percentiles (computed inside ``mask`` if given).

    With ``rescale_to`` the clipped range is mapped linearly onto it (constant data -> midpoint);
    with ``None`` the clipped values are returned unscaled. Returns float32.
    """
    if not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"need 0 <= lower < upper <= 100 (got {lower}, {upper})")
    a, like = _norm_in(x)
    vals = _masked(a, mask)
    vmin, vmax = (float(v) for v in np.percentile(vals, [lower, upper]))
    y = np.clip(a, vmin, vmax)
    if rescale_to is not None:
        y = _rescale(y, vmin, vmax, float(rescale_to[0]), float(rescale_to[1]))
    return _norm_out(y, like)


def zscore(x: Any, mask: Any = None, eps: float = 1e-8) -> Any:
    """``(x - mean) / (std + eps)`` with mean/std from the voxels in ``mask`` (all voxels if None).

    The whole array is normalised with those statistics. Returns float32.
    """
    a, like = _norm_in(x)
    vals = _masked(a, mask).astype(np.float64)
    return _norm_out((a - vals.mean()) / (vals.std() + eps), like)


def window(x: Any, center: float, width: float, out_range: tuple[float, float] = (-1.0, 1.0)) -> Any:
    """CT intensity window: clip to ``[center - width/2, center + width/2]`` (HU) and map to ``out_range``."""
    if width <= 0:
        raise ValueError(f"window width must be positive (got {width})")
    a, like = _norm_in(x)
    lo, hi = center - width / 2.0, center + width / 2.0
    return _norm_out(_rescale(np.clip(a, lo, hi), lo, hi, float(out_range[0]), float(out_range[1])), like)


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


# --------------------------------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------------------------------


def write_h5(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Atomically write ``arrays`` as datasets (``"a/b"`` keys create groups) and root ``attrs``."""
    import h5py

    path = Path(path)
    try:
        with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                arr = _as_numpy(value)
                comp = compression if arr.ndim > 0 and arr.size > 0 else None
                f.create_dataset(key, data=arr, compression=comp)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
    except MedicalIOError:
        raise
    except Exception as exc:
        raise _err(
            path,
            f"writing HDF5 failed ({_short(exc)}); any previous file there is unchanged",
            "check the keys/values (numeric arrays, simple attributes), disk space and permissions",
        ) from exc
    return path


class H5ArrayReader:
    """Lazy HDF5 reader, safe with DataLoader workers.

    The file is opened on first access in each process (and reopened after a fork); pickling drops the
    handle. Keys are full dataset paths (``"group/name"``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise _err(self.path, "HDF5 file does not exist", "check the path or create it with write_h5")
        self._file: Any = None
        self._pid: int | None = None

    def _h5(self) -> Any:
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = None  # never close a handle inherited through fork
            try:
                self._file = h5py.File(self.path, "r")
            except Exception as exc:
                raise _err(
                    self.path, f"cannot open HDF5 file ({exc})", "re-create or re-download it"
                ) from exc
            self._pid = os.getpid()
        return self._file

    def keys(self) -> list[str]:
        """All dataset paths, sorted."""
        import h5py

        names: list[str] = []
        self._h5().visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    def _dataset(self, key: str) -> Any:
        f = self._h5()
        if key not in f:
            raise KeyError(f"{self.path}: no dataset {key!r}; available: {self.keys()[:20]}")
        return f[key]

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._dataset(key)[()])

    def __contains__(self, key: str) -> bool:
        return key in self._h5()

    def __len__(self) -> int:
        return len(self.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a dataset without reading it."""
        return tuple(self._dataset(key).shape)

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        """Read only ``dataset[index]`` (int, slice or tuple thereof) from disk."""
        return np.asarray(self._dataset(key)[index])

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as a plain dict."""
        return {k: v for k, v in self._h5().attrs.items()}

    def close(self) -> None:
        """Close the handle (reopened automatically on next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self) -> H5ArrayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# --------------------------------------------------------------------------------------------------
# LMDB
# --------------------------------------------------------------------------------------------------

_LMDB_MAGIC = b"MSNA1"


def _encode_array(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("object arrays cannot be stored in LMDB; convert to a numeric dtype")
    header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape)}).encode()
    return _LMDB_MAGIC + struct.pack("<I", len(header)) + header + arr.tobytes()


def _decode_array(buf: bytes | memoryview) -> np.ndarray:
    buf = memoryview(buf)
    if bytes(buf[: len(_LMDB_MAGIC)]) != _LMDB_MAGIC:
        raise ValueError("value is not an array written by LMDBArrayWriter")
    start = len(_LMDB_MAGIC)
    (hlen,) = struct.unpack("<I", buf[start : start + 4])
    meta = json.loads(bytes(buf[start + 4 : start + 4 + hlen]))
    data = np.frombuffer(buf[start + 4 + hlen :], dtype=np.dtype(meta["dtype"]))
    return data.reshape(meta["shape"]).copy()


class LMDBArrayWriter:
    """Write numpy arrays into an LMDB database (a folder) under string keys.

    Each value stores a dtype+shape header and the raw C-order bytes. ``dtype`` (e.g. ``np.float16``)
    casts floating arrays for storage. Call :meth:`commit` (or use as a context manager) to persist.
    """

    def __init__(self, path: str | os.PathLike, map_size: int = 2**34, dtype: Any = None):
        import lmdb

        self.path = Path(path)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(self.path), map_size=int(map_size), subdir=True, meminit=False)
        except Exception as exc:
            raise _err(
                self.path, f"cannot create LMDB database ({exc})", "check permissions/disk space"
            ) from exc
        self._txn = self._env.begin(write=True)

    def put(self, key: str, array: Any, dtype: Any = None) -> None:
        """Store ``array`` under ``key`` (``dtype`` overrides the writer's storage dtype)."""
        arr = _as_numpy(array)
        target = np.dtype(dtype) if dtype is not None else self.dtype
        if target is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(target)
        try:
            self._txn.put(key.encode(), _encode_array(arr))
        except Exception as exc:
            raise _err(
                self.path, f"storing {key!r} failed ({type(exc).__name__}: {exc})", "increase map_size"
            ) from exc

    def commit(self) -> None:
        """Persist everything put so far and start a new transaction."""
        self._txn.commit()
        self._txn = self._env.begin(write=True)

    def close(self) -> None:
        """Commit and close the database."""
        if self._txn is not None:
            self._txn.commit()
            self._txn = None
            self._env.close()

    def __enter__(self) -> LMDBArrayWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._txn is not None:
            self._txn.abort()
            self._txn = None
            self._env.close()
        else:
            self.close()


# Read-only environments shared per (process, folder): LMDB forbids opening one twice in a process.
_LMDB_ENVS: dict[tuple[int, str], list[Any]] = {}


def _lmdb_acquire(path: Path) -> Any:
    import lmdb

    key = (os.getpid(), os.path.realpath(path))
    entry = _LMDB_ENVS.get(key)
    if entry is None:
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        except Exception as exc:
            raise _err(
                path, f"cannot open LMDB database ({exc})", "re-create it with LMDBArrayWriter"
            ) from exc
        entry = _LMDB_ENVS[key] = [env, 0]
    entry[1] += 1
    return entry[0]


def _lmdb_release(path: Path) -> None:
    key = (os.getpid(), os.path.realpath(path))
    entry = _LMDB_ENVS.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _LMDB_ENVS[key]


class LMDBArrayReader:
    """Lazy read-only LMDB array reader (opened per process with ``lock=False``; DataLoader-safe).

    Readers of the same folder in one process share a single environment.

    ``dtype`` casts arrays on read (e.g. back to float32 after float16 storage).
    """

    def __init__(self, path: str | os.PathLike, dtype: Any = None):
        self.path = Path(path)
        self.dtype = None if dtype is None else np.dtype(dtype)
        if not (self.path / "data.mdb").is_file():
            raise _err(
                self.path,
                "LMDB database does not exist (no data.mdb in that folder)",
                "check the path or build the database with LMDBArrayWriter",
            )
        self._env: Any = None
        self._pid: int | None = None

    def _db(self) -> Any:
        if self._env is None or self._pid != os.getpid():
            self._env = None  # an environment inherited through fork must not be used or closed
            self._env = _lmdb_acquire(self.path)
            self._pid = os.getpid()
        return self._env

    def __len__(self) -> int:
        return int(self._db().stat()["entries"])

    def keys(self) -> list[str]:
        """All keys, in LMDB (byte-sorted) order."""
        with self._db().begin() as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def __contains__(self, key: str) -> bool:
        with self._db().begin() as txn:
            return txn.get(key.encode()) is not None

    def __getitem__(self, key: str) -> np.ndarray:
        with self._db().begin(buffers=True) as txn:
            buf = txn.get(key.encode())
            if buf is None:
                raise KeyError(f"{self.path}: no entry {key!r} in the LMDB database")
            arr = _decode_array(buf)
        return arr.astype(self.dtype) if self.dtype is not None else arr

    def close(self) -> None:
        """Release the environment (reopened automatically on next access)."""
        if self._env is not None and self._pid == os.getpid():
            _lmdb_release(self.path)
        self._env, self._pid = None, None

    def __enter__(self) -> LMDBArrayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "_env": None, "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

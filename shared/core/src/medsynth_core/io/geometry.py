"""Orientation and resampling of :class:`MedicalImage` volumes (SimpleITK resamplers)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
from nibabel import orientations as nio

from medsynth_core.io.image import (
    _INTERPOLATORS,
    MedicalImage,
    _lps_geometry,
    to_sitk,
)

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

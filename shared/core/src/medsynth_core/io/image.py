"""The image container (:class:`MedicalImage`: disk-order array + RAS+ affine), IO errors and the
SimpleITK <-> MedicalImage geometry conversion (LPS <-> RAS)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

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

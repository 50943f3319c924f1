"""Intensity normalisation: min-max to a range, percentile clipping, z-score, CT windows."""

from __future__ import annotations

from typing import Any

import numpy as np

from medsynth_core.io.image import _as_numpy, _is_torch

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


def warn_if_constant(x: Any, source: str, consequence: str = "the model sees an all-zero input") -> bool:
    """Log one warning when an input image is constant (all-zero included): min-max normalisation maps it
    to zeros, so whatever is written from it carries no information about the image (issue 18: such
    inputs passed silently). Returns True when ``x`` is constant. ``source`` names the file."""
    import logging

    arr = _as_numpy(x)
    if arr.size == 0:
        return True
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi > lo:
        return False
    what = "all zero" if lo == 0.0 else f"constant (every voxel = {lo:g})"
    logging.getLogger("medsynth").warning(
        "%s: image is %s; %s and the output is not informative (wrong file, or an empty mask?)",
        source,
        what,
        consequence,
    )
    return True

"""Helpers shared by the phantom families: seeded smooth noise, shapes, Rician noise, name checks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


# ----------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------
def _gaussian_transfer(shape: tuple[int, ...], sigma_vox: Any) -> np.ndarray:
    """Fourier transfer function (rfftn layout) of a Gaussian with per-axis ``sigma_vox``."""
    sig = np.broadcast_to(np.asarray(sigma_vox, dtype=np.float64), (len(shape),))
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    arg = np.zeros([1] * len(shape))
    for ax, f in enumerate(freqs):
        view = [1] * len(shape)
        view[ax] = f.size
        arg = arg + (sig[ax] * f.reshape(view)) ** 2
    return np.exp(-2.0 * np.pi**2 * arg)


def _blur(x: np.ndarray, sigma_vox: Any) -> np.ndarray:
    """Periodic (FFT) Gaussian blur of ``x``; returns float64."""
    spec = np.fft.rfftn(x) * _gaussian_transfer(x.shape, sigma_vox)
    return np.fft.irfftn(spec, s=x.shape, axes=tuple(range(x.ndim)))


def smooth_noise(
    shape: Sequence[int], rng: np.random.Generator, sigma_vox: float | Sequence[float]
) -> np.ndarray:
    """Zero-mean, unit-std smooth random field: white noise low-passed by a Gaussian in Fourier space.

    ``shape`` may have any number of axes (2D and 3D are the intended uses); ``sigma_vox`` is the Gaussian
    standard deviation in voxels, a scalar or one value per axis. The field is periodic. Returns float32.
    """
    shape = tuple(int(s) for s in shape)
    out = _blur(rng.standard_normal(shape), sigma_vox)
    out -= out.mean()
    std = out.std()
    if std > 0:
        out /= std
    return out.astype(np.float32)


def _grid(shape: Sequence[int]) -> list[np.ndarray]:
    """Sparse voxel-centre coordinates in [-1, 1] per axis (ij indexing, broadcastable, float64)."""
    return np.meshgrid(*[(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape], indexing="ij", sparse=True)


def _ellipse(
    y: np.ndarray, x: np.ndarray, centre: Sequence[float], axes: Sequence[float], angle: float = 0.0
):
    """Normalised squared radius of a rotated ellipse (``<= 1`` inside)."""
    dy, dx = y - centre[0], x - centre[1]
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dy - s * dx, s * dy + c * dx
    return (u / axes[0]) ** 2 + (v / axes[1]) ** 2


def _ellipsoid(coords: Sequence[np.ndarray], centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    """Normalised squared radius of an axis-aligned ellipsoid in any dimension (``<= 1`` inside)."""
    return sum(((c - c0) / a) ** 2 for c, c0, a in zip(coords, centre, axes))


def _segment_dist(y: np.ndarray, x: np.ndarray, p0: Sequence[float], p1: Sequence[float]) -> np.ndarray:
    """Distance from each (y, x) to the segment p0-p1."""
    dy, dx = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((y - p0[0]) * dy + (x - p0[1]) * dx) / max(dy * dy + dx * dx, 1e-12), 0.0, 1.0)
    return np.hypot(y - (p0[0] + t * dy), x - (p0[1] + t * dx))


def _rician(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``x`` plus complex Gaussian noise of std ``sigma`` (Rician statistics)."""
    if sigma <= 0:
        return x
    return np.hypot(x + sigma * rng.standard_normal(x.shape), sigma * rng.standard_normal(x.shape))


def _check_names(requested: Sequence[str], valid: Sequence[str], what: str) -> tuple[str, ...]:
    requested = (requested,) if isinstance(requested, str) else tuple(requested)
    bad = [r for r in requested if r not in valid]
    if bad:
        raise ValueError(f"unknown {what} {bad}; valid {what}s are {list(valid)}")
    if not requested or len(set(requested)) != len(requested):
        raise ValueError(f"need one or more distinct {what}s from {list(valid)}, got {list(requested)}")
    return requested

"""Multi-contrast brain MR volumes from T1/T2/PD maps, plus thick-slice helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch

from medsynth_core.phantoms._common import _check_names, _ellipsoid, _grid, _rician, smooth_noise

# ----------------------------------------------------------------------------------------------------------
# (b) multi-contrast brain MR volumes
# ----------------------------------------------------------------------------------------------------------
# internal brain labels; 5 (skull) and 6 (scalp) are reported as background in BrainPhantom.tissue
_BG, _CSF, _GM, _WM, _LES, _SKULL, _SCALP = range(7)

BRAIN_TISSUE_PARAMS = MappingProxyType(
    {  # (T1 ms, T2 ms, PD a.u.), representative of published 1.5 T measurements
        "background": (1000.0, 100.0, 0.0),
        "CSF": (4000.0, 2000.0, 1.0),
        "GM": (1100.0, 95.0, 0.80),
        "WM": (700.0, 75.0, 0.70),
        "lesion": (1200.0, 140.0, 0.85),  # demyelinating-lesion-like: prolonged T1 and T2
        "skull": (300.0, 5.0, 0.05),
        "scalp": (260.0, 80.0, 0.90),  # fat-dominated
    }
)
"""Literature-like tissue relaxation times and proton density at 1.5 T (read-only)."""

_BRAIN_PARAM_TABLE = np.array(list(BRAIN_TISSUE_PARAMS.values()), dtype=np.float64)  # (label, 3)
_CSF_T1 = BRAIN_TISSUE_PARAMS["CSF"][0]
_FLAIR_TR = 9000.0

BRAIN_SEQUENCES = MappingProxyType(
    {  # repetition / echo / inversion times in ms
        "T1w": MappingProxyType({"TR": 450.0, "TE": 10.0}),  # short TR, short TE
        "T2w": MappingProxyType({"TR": 4000.0, "TE": 100.0}),  # long TR, long TE
        "PD": MappingProxyType({"TR": 3000.0, "TE": 15.0}),  # long TR, short TE
        "FLAIR": MappingProxyType(  # inversion recovery, TI chosen to null CSF exactly
            {
                "TR": _FLAIR_TR,
                "TE": 120.0,
                "TI": _CSF_T1 * math.log(2.0 / (1.0 + math.exp(-_FLAIR_TR / _CSF_T1))),
            }
        ),
    }
)
"""Sequence timings per contrast used by :func:`brain_volumes` (read-only)."""


def spin_echo_signal(pd, t1, t2, tr: float, te: float):
    """Spin-echo signal ``PD * (1 - exp(-TR/T1)) * exp(-TE/T2)`` (arrays or scalars, times in ms)."""
    return pd * (1.0 - np.exp(-tr / t1)) * np.exp(-te / t2)


def inversion_recovery_signal(pd, t1, t2, tr: float, te: float, ti: float):
    """Inversion-recovery magnitude ``PD * |1 - 2 exp(-TI/T1) + exp(-TR/T1)| * exp(-TE/T2)``."""
    return pd * np.abs(1.0 - 2.0 * np.exp(-ti / t1) + np.exp(-tr / t1)) * np.exp(-te / t2)


def thick_slices(volume, factor: int, axis: int = 0, mode: str = "average"):
    """Simulate a thick-slice acquisition along ``axis`` (numpy array or torch tensor, type preserved).

    The axis is cut into ``size // factor`` complete blocks of ``factor`` slices (a trailing remainder is
    dropped). ``mode="average"`` returns each block's mean (partial-volume slab), ``mode="pick"`` returns
    the slice at each block's centre (index ``k * factor + factor // 2``), i.e. every ``factor``-th slice.
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    if mode not in ("average", "pick"):
        raise ValueError(f"mode must be 'average' or 'pick', got {mode!r}")
    factor = int(factor)
    n = volume.shape[axis] // factor
    if n == 0:
        raise ValueError(f"axis {axis} has {volume.shape[axis]} slices, fewer than factor={factor}")
    if isinstance(volume, torch.Tensor):
        v = volume.movedim(axis, 0)[: n * factor]
        if mode == "pick":
            out = v[factor // 2 :: factor]
        else:
            v = v if v.is_floating_point() else v.float()
            out = v.reshape(n, factor, *v.shape[1:]).mean(1)
        return out.movedim(0, axis)
    v = np.moveaxis(np.asarray(volume), axis, 0)[: n * factor]
    if mode == "pick":
        out = v[factor // 2 :: factor]
    else:
        out = v.reshape(n, factor, *v.shape[1:]).mean(1)
    return np.moveaxis(out, 0, axis)


def upsample_slices(volume, factor: int, axis: int = 0, size: int | None = None):
    """Nearest-slice inverse of :func:`thick_slices`: repeat every slice ``factor`` times along ``axis``.

    ``size`` (optional) crops, or pads by repeating the last slice, to that many slices. Works on numpy
    arrays and torch tensors (type preserved).
    """
    if int(factor) != factor or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor}")
    factor = int(factor)
    if isinstance(volume, torch.Tensor):
        out = volume.repeat_interleave(factor, dim=axis)
        if size is not None:
            n = out.shape[axis]
            if size <= n:
                out = out.narrow(axis, 0, size)
            else:
                last = out.narrow(axis, n - 1, 1)
                out = torch.cat(
                    [out, last.expand(*[size - n if d == axis % out.ndim else -1 for d in range(out.ndim)])],
                    axis,
                )
        return out
    out = np.repeat(np.asarray(volume), factor, axis=axis)
    if size is not None:
        n = out.shape[axis]
        idx = np.minimum(np.arange(size), n - 1)
        out = np.take(out, idx, axis=axis)
    return out


@dataclass(frozen=True, eq=False)
class BrainPhantom:
    """Multi-contrast brain MR phantom; every volume is ``(D, H, W)`` (D = slice axis).

    Attributes:
        tissue: int64 labels: 0 background (including skull and scalp), 1 CSF, 2 GM, 3 WM, 4 lesion.
        t1: float32 T1 map in ms (textured).
        t2: float32 T2 map in ms (textured).
        pd: float32 proton-density map in arbitrary units (0 outside the head).
        images: contrast -> float32 ``(D, H, W)`` image normalised to [0, 1] (divided by its maximum).
        thick: contrast -> float32 thick-slice version, ``thick_factor`` slices averaged along ``thick_axis``.
        spacing: voxel size in mm of the full-resolution volumes, ``(d, h, w)``.
        thick_spacing: voxel size in mm of the thick volumes.
        thick_factor: slices per thick slab.
        thick_axis: axis along which slabs were formed.
        head_mask: bool, inside the scalp.
        sequences: contrast -> sequence timings (``TR``, ``TE`` and for FLAIR ``TI``, ms) that were used.
    """

    tissue: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    pd: np.ndarray
    images: dict[str, np.ndarray]
    thick: dict[str, np.ndarray]
    spacing: tuple[float, float, float]
    thick_spacing: tuple[float, float, float]
    thick_factor: int
    thick_axis: int
    head_mask: np.ndarray
    sequences: dict[str, dict[str, float]]


def _brain_labels(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Internal brain label volume (0 bg, 1 CSF, 2 GM, 3 WM, 4 lesion, 5 skull, 6 scalp), uint8."""
    z, y, x = _grid(shape)
    sig = np.asarray(shape, dtype=np.float64)
    axes = (0.84 + rng.uniform(-0.03, 0.03), 0.92 + rng.uniform(-0.03, 0.03), 0.76 + rng.uniform(-0.03, 0.03))
    rho = np.sqrt(_ellipsoid((z, y, x), (0.0, 0.0, 0.0), axes)) + 0.015 * smooth_noise(shape, rng, sig / 6)
    fold = smooth_noise(shape, rng, sig / 30)  # cortical folding pattern
    lab = np.zeros(shape, np.uint8)
    lab[rho <= 1.0] = _SCALP
    lab[rho <= 0.93] = _SKULL
    lab[rho <= 0.87] = _CSF
    brain = rho <= 0.83
    lab[brain] = _GM
    lab[rho <= 0.68 + 0.07 * fold] = _WM  # gyral white-matter cores follow the folding pattern
    lab[brain & (rho > 0.73) & (fold < -1.0)] = _CSF  # sulci between the gyri
    for side in (-1.0, 1.0):
        deep_gm = _ellipsoid((z, y, x), (-0.08, 0.08, side * 0.21), (0.13, 0.15, 0.1)) <= 1
        lab[deep_gm] = _GM
        vent = _ellipsoid((z, y, x), (0.08, -0.05, side * 0.11), (0.16, 0.36, 0.07 + rng.uniform(0, 0.03)))
        lab[vent <= 1] = _CSF
    wm = lab == _WM
    r_min = 3.0 / min(shape)  # at least ~1.5 voxels radius
    for _ in range(int(rng.integers(2, 4))):
        side = rng.choice([-1.0, 1.0])
        centre = (rng.uniform(-0.1, 0.3), rng.uniform(-0.35, 0.25), side * rng.uniform(0.22, 0.32))
        r = max(rng.uniform(0.06, 0.1), r_min)
        les = (_ellipsoid((z, y, x), centre, (r, r * rng.uniform(1.0, 1.6), r)) <= 1) & wm
        if not les.any():  # tiny volumes: keep at least the centre voxel
            idx = tuple(min(int((c + 1) / 2 * n), n - 1) for c, n in zip(centre, shape))
            les[idx] = True
        lab[les] = _LES
    return lab


def _brain_maps(lab: np.ndarray, rng: np.random.Generator, texture: float = 0.03):
    """Textured (T1, T2, PD) float64 maps for an internal brain label volume."""
    sig = np.asarray(lab.shape, dtype=np.float64) / 20
    params = _BRAIN_PARAM_TABLE[lab]  # (D, H, W, 3)
    t1 = params[..., 0] * (1.0 + texture * smooth_noise(lab.shape, rng, sig))
    t2 = params[..., 1] * (1.0 + texture * smooth_noise(lab.shape, rng, sig))
    pd = params[..., 2] * (1.0 + 0.7 * texture * smooth_noise(lab.shape, rng, sig))
    return t1, t2, pd


def _brain_signal(contrast: str, t1, t2, pd):
    seq = BRAIN_SEQUENCES[contrast]
    if "TI" in seq:
        return inversion_recovery_signal(pd, t1, t2, seq["TR"], seq["TE"], seq["TI"])
    return spin_echo_signal(pd, t1, t2, seq["TR"], seq["TE"])


def brain_volumes(
    shape: Sequence[int] = (32, 32, 32),
    seed: int = 0,
    contrasts: Sequence[str] = ("T1w", "T2w", "PD", "FLAIR"),
    thick_factor: int = 4,
    thick_axis: int = 0,
    noise: float = 0.01,
    fov_mm: float = 240.0,
) -> BrainPhantom:
    """Multi-contrast brain MR phantom with thick-slice versions.

    An ellipsoidal head (scalp, skull), CSF (subarachnoid space, sulci, lateral ventricles), a folded
    cortical GM ribbon, deep GM nuclei, WM and two or three WM lesions. T1/T2/PD maps take the values of
    :data:`BRAIN_TISSUE_PARAMS` (1.5 T) with a few percent of smooth texture; each contrast is computed with
    the spin-echo equation (T1w, T2w, PD) or the CSF-nulling inversion-recovery equation (FLAIR) using
    :data:`BRAIN_SEQUENCES`, plus Rician noise of std ``noise`` relative to the image maximum, then
    normalised to [0, 1]. ``thick`` holds :func:`thick_slices` (average) of each image. The field of view is
    ``fov_mm`` along every axis, so ``spacing = fov_mm / shape``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3D with every size >= 4, got {shape}")
    contrasts = _check_names(contrasts, tuple(BRAIN_SEQUENCES), "contrast")
    rng = np.random.default_rng(seed)
    lab = _brain_labels(shape, rng)
    t1, t2, pd = _brain_maps(lab, rng)
    images, thick = {}, {}
    for c in contrasts:
        s = _brain_signal(c, t1, t2, pd)
        s = _rician(s, noise * s.max(), rng)
        img = (s / s.max()).astype(np.float32)
        images[c] = img
        thick[c] = thick_slices(img, thick_factor, thick_axis).astype(np.float32)
    spacing = tuple(fov_mm / n for n in shape)
    thick_spacing = tuple(sp * thick_factor if ax == thick_axis % 3 else sp for ax, sp in enumerate(spacing))
    tissue = np.where(lab >= _SKULL, 0, lab).astype(np.int64)
    sequences = {c: dict(BRAIN_SEQUENCES[c]) for c in contrasts}
    return BrainPhantom(
        tissue=tissue,
        t1=t1.astype(np.float32),
        t2=t2.astype(np.float32),
        pd=pd.astype(np.float32),
        images=images,
        thick=thick,
        spacing=spacing,
        thick_spacing=thick_spacing,
        thick_factor=int(thick_factor),
        thick_axis=int(thick_axis),
        head_mask=lab > 0,
        sequences=sequences,
    )

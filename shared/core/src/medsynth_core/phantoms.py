"""Deterministic synthetic phantoms that stand in for real medical data in demos and tests.

Every generator takes a ``seed``, draws from its own ``np.random.default_rng`` (never the global RNG), is
fully vectorised and returns ``float32`` images inside a small frozen dataclass. The same seed gives
bit-identical arrays; a different seed gives different anatomy.

Axis order follows torch / SimpleITK arrays: volumes are ``(D, H, W)`` (slice, row, column) and slices are
``(H, W)``; leading batch-like axes (samples, phases, frames) come first.

Generators:

* :func:`contrast_phase_slices` - paired multi-phase contrast-enhanced abdominal axial slices.
* :func:`brain_volumes` - multi-contrast brain MR volumes from T1/T2/PD maps plus thick-slice versions.
* :func:`cardiac_cine` - beating short-axis cine stack and long-axis planes sampled from one analytic scene.
* :func:`labelled_anatomy` - 2D/3D image with smooth nested/adjacent labelled structures.
* :func:`classed_volumes` - small CT/MR-like volumes whose class (body region / modality) is visible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

__all__ = [
    "ABDOMEN_TISSUES",
    "BRAIN_SEQUENCES",
    "BRAIN_TISSUE_PARAMS",
    "CLASS_NAMES",
    "ENHANCEMENT_HU",
    "PHASE_NAMES",
    "BrainPhantom",
    "CardiacPhantom",
    "CardiacScene",
    "ClassedVolumes",
    "LabelledImage",
    "LaxPlane",
    "PhaseSlices",
    "brain_volumes",
    "cardiac_cine",
    "classed_volumes",
    "contrast_phase_slices",
    "inversion_recovery_signal",
    "labelled_anatomy",
    "smooth_noise",
    "spin_echo_signal",
    "thick_slices",
    "upsample_slices",
]


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


# ----------------------------------------------------------------------------------------------------------
# (a) multi-phase contrast-enhanced abdominal slices
# ----------------------------------------------------------------------------------------------------------
PHASE_NAMES: tuple[str, ...] = ("pre", "arterial", "venous", "delay")
"""Contrast phases known to :func:`contrast_phase_slices` (unenhanced, arterial, portal-venous, delayed)."""

ABDOMEN_TISSUES: tuple[str, ...] = (
    "air", "fat", "soft_tissue", "muscle", "bone", "aorta", "ivc", "portal_vein", "hepatic_vein", "liver",
    "spleen", "kidney_cortex", "kidney_medulla", "lesion_hyper", "lesion_cyst", "lesion_hypo",
)  # fmt: skip
"""Tissue names; ``PhaseSlices.tissue`` holds indices into this tuple."""

ENHANCEMENT_HU = MappingProxyType(
    {  # CT-like attenuation (HU) per phase: pre, arterial, venous, delay
        "air": (-1000.0, -1000.0, -1000.0, -1000.0),
        "fat": (-100.0, -100.0, -100.0, -100.0),
        "soft_tissue": (40.0, 50.0, 65.0, 60.0),
        "muscle": (50.0, 55.0, 65.0, 60.0),
        "bone": (700.0, 700.0, 700.0, 700.0),
        "aorta": (40.0, 320.0, 160.0, 120.0),  # arterial peak
        "ivc": (40.0, 70.0, 150.0, 115.0),
        "portal_vein": (40.0, 120.0, 180.0, 120.0),  # venous peak
        "hepatic_vein": (40.0, 50.0, 160.0, 120.0),
        "liver": (55.0, 70.0, 110.0, 90.0),  # parenchyma peaks in the venous phase
        "spleen": (45.0, 110.0, 120.0, 100.0),
        "kidney_cortex": (35.0, 190.0, 170.0, 140.0),  # corticomedullary differentiation in arterial
        "kidney_medulla": (30.0, 70.0, 165.0, 150.0),
        "lesion_hyper": (45.0, 140.0, 90.0, 65.0),  # arterial hyper-enhancement, washout in delay
        "lesion_cyst": (8.0, 8.0, 8.0, 8.0),  # never enhances
        "lesion_hypo": (40.0, 50.0, 70.0, 70.0),  # hypo-enhancing
    }
)
"""Per-tissue attenuation in HU for each phase of :data:`PHASE_NAMES` (read-only)."""

_HU_WINDOW = (-160.0, 240.0)  # soft-tissue window (level 40, width 400) mapped to [0, 1]
_HU_TABLE = np.array([ENHANCEMENT_HU[t] for t in ABDOMEN_TISSUES], dtype=np.float64).T  # (phase, tissue)
_T = {name: i for i, name in enumerate(ABDOMEN_TISSUES)}


@dataclass(frozen=True, eq=False)
class PhaseSlices:
    """Paired multi-phase abdominal slices (all arrays ``(n, H, W)``; one entry per slice along axis 0).

    Attributes:
        images: phase name -> float32 ``(n, H, W)`` in [0, 1] (soft-tissue window), in the requested order.
        lesion_mask: bool ``(n, H, W)``, union of all lesions; identical for every phase.
        liver_mask: bool ``(n, H, W)``, the liver outline (parenchyma, intrahepatic vessels and lesions).
        body_mask: bool ``(n, H, W)``, inside the skin.
        tissue: uint8 ``(n, H, W)`` indices into :data:`ABDOMEN_TISSUES` (shared by all phases).
        phases: the phase names, in order.
    """

    images: dict[str, np.ndarray]
    lesion_mask: np.ndarray
    liver_mask: np.ndarray
    body_mask: np.ndarray
    tissue: np.ndarray
    phases: tuple[str, ...]


def _abdomen_slice(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one axial abdominal slice; returns (tissue uint8 (H, W), body mask)."""
    y, x = _grid((size, size))
    px = 2.0 / size  # one pixel in normalised units
    t = np.zeros((size, size), np.uint8)
    cy, cx = 0.04 + rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
    ay, ax = rng.uniform(0.58, 0.66), rng.uniform(0.84, 0.92)
    body = _ellipse(y, x, (cy, cx), (ay, ax)) <= 1
    rim = rng.uniform(0.06, 0.10)
    inner = _ellipse(y, x, (cy, cx), (ay - rim, ax - rim)) <= 1
    t[body] = _T["fat"]
    t[inner] = _T["soft_tissue"]

    spleen = (_ellipse(y, x, (cy + 0.02, cx + 0.55), (0.2, 0.11), -0.5 + rng.uniform(-0.1, 0.1)) <= 1) & inner
    t[spleen] = _T["spleen"]

    # liver: large right lobe (image left) plus a left lobe reaching across the midline
    lc = (cy - 0.08 + rng.uniform(-0.03, 0.03), cx - 0.36 + rng.uniform(-0.03, 0.03))
    la = (rng.uniform(0.36, 0.42), rng.uniform(0.32, 0.37))
    lang = 0.35 + rng.uniform(-0.1, 0.1)
    right_lobe = _ellipse(y, x, lc, la, lang)
    liver = (right_lobe <= 1) | (
        _ellipse(y, x, (cy - 0.3, cx + 0.02), (0.13, rng.uniform(0.24, 0.32)), 0.2) <= 1
    )
    liver &= inner
    t[liver] = _T["liver"]

    sy = cy + 0.62 * ay  # vertebral body centre (posterior = larger row)
    ivc_c = (sy - 0.15, cx - 0.13)
    hilum = (cy + 0.02, cx - 0.2)
    width = max(0.018, 0.6 * px)
    for _ in range(int(rng.integers(2, 4))):  # portal branches fanning out from the hilum
        ang = rng.uniform(2.2, 4.0)
        end = (hilum[0] + 0.3 * math.sin(ang), hilum[1] + 0.3 * math.cos(ang))
        t[liver & (_segment_dist(y, x, hilum, end) < width)] = _T["portal_vein"]
    for _ in range(int(rng.integers(2, 4))):  # hepatic veins converging on the IVC
        ang = rng.uniform(3.4, 4.6)
        end = (ivc_c[0] + 0.5 * math.sin(ang), ivc_c[1] + 0.45 * math.cos(ang))
        t[liver & (_segment_dist(y, x, ivc_c, end) < 0.8 * width)] = _T["hepatic_vein"]

    # lesions inside the right lobe: the first is hyper-enhancing, the second cyst-like
    n_les = int(rng.integers(1, 4))
    kinds = ("lesion_hyper", "lesion_cyst", str(rng.choice(["lesion_hypo", "lesion_hyper"])))[:n_les]
    c, s = math.cos(lang), math.sin(lang)
    for kind in kinds:
        rho, phi = 0.55 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
        u, v = rho * la[0] * math.cos(phi), rho * la[1] * math.sin(phi)  # ellipse frame -> image frame
        centre = (lc[0] + c * u + s * v, lc[1] - s * u + c * v)
        r = max(rng.uniform(0.05, 0.1), 1.6 * px)
        les = (_ellipse(y, x, centre, (r, r * rng.uniform(0.8, 1.25)), rng.uniform(0, math.pi)) <= 1) & liver
        t[les] = _T[kind]

    for side in (-1.0, 1.0):
        kc = (sy - 0.02, cx + side * 0.34)
        kidney = _ellipse(y, x, kc, (0.12, 0.075), side * 0.5)
        t[(kidney <= 1) & inner] = _T["kidney_cortex"]
        t[(kidney <= 0.35) & inner] = _T["kidney_medulla"]
        t[(_ellipse(y, x, (sy + 0.1, cx + side * 0.15), (0.08, 0.09)) <= 1) & inner] = _T["muscle"]
    t[_ellipse(y, x, (sy, cx), (0.1, 0.11)) <= 1] = _T["bone"]
    t[(_ellipse(y, x, (sy + 0.15, cx), (0.07, 0.03)) <= 1) & body] = _T["bone"]
    t[_ellipse(y, x, (sy - 0.17, cx + 0.05), (0.045, 0.045)) <= 1] = _T["aorta"]
    t[_ellipse(y, x, ivc_c, (0.04, 0.055)) <= 1] = _T["ivc"]
    return t, body


def contrast_phase_slices(
    n: int = 4,
    size: int = 64,
    phases: Sequence[str] = PHASE_NAMES,
    seed: int = 0,
    noise: float = 0.012,
) -> PhaseSlices:
    """Paired multi-phase contrast-enhanced abdominal axial slices.

    Each slice has an elliptical body with a subcutaneous fat rim, liver with portal/hepatic vessels, spleen,
    kidneys (cortex/medulla), spine, aorta, IVC and one to three liver lesions (the first hyper-enhancing with
    washout, the second cyst-like and never enhancing, an optional third hypo- or hyper-enhancing). Tissue
    attenuation follows :data:`ENHANCEMENT_HU` per phase and is shown in a soft-tissue window; a smooth
    texture and bias field (shared by the phases of a slice) and independent Rician-like noise of std
    ``noise`` per phase are added. Geometry is identical across the phases of a slice and differs across
    slices. Unknown phase names raise ``ValueError``.
    """
    phases = _check_names(phases, PHASE_NAMES, "phase")
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    tissues, bodies, textures, biases = [], [], [], []
    for _ in range(n):
        t, body = _abdomen_slice(size, rng)
        tissues.append(t)
        bodies.append(body)
        textures.append(6.0 * smooth_noise((size, size), rng, size / 24))
        biases.append(1.0 + 0.04 * smooth_noise((size, size), rng, size / 3))
    tissue = np.stack(tissues)
    texture = np.where(tissue == _T["air"], 0.0, np.stack(textures))
    bias = np.stack(biases)
    lo, hi = _HU_WINDOW
    images = {}
    for ph in phases:
        hu = _HU_TABLE[PHASE_NAMES.index(ph)][tissue] + texture
        img = np.clip((hu - lo) / (hi - lo), 0.0, 1.0) * bias
        images[ph] = np.clip(_rician(img, noise, rng), 0.0, 1.0).astype(np.float32)
    lesion_ids = [_T["lesion_hyper"], _T["lesion_cyst"], _T["lesion_hypo"]]
    lesion = np.isin(tissue, lesion_ids)
    liver = np.isin(tissue, [_T["liver"], _T["portal_vein"], _T["hepatic_vein"], *lesion_ids])
    return PhaseSlices(images, lesion, liver, np.stack(bodies), tissue, phases)


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


# ----------------------------------------------------------------------------------------------------------
# (c) cardiac cine: analytic beating heart, short-axis stack and long-axis planes
# ----------------------------------------------------------------------------------------------------------
_LAX_ANGLES = {"2ch": 90.0, "3ch": 45.0, "4ch": 0.0}  # rotation about the long axis, from the RV direction


@dataclass(frozen=True, eq=False)
class CardiacScene:
    """Analytic beating-heart scene in world coordinates (mm).

    The heart frame has origin ``origin`` (centre of the LV base plane) and orthonormal columns of ``axes``:
    ``e1`` points from the LV axis towards the RV, ``e2 = e3 x e1``, ``e3`` is the long axis from base to
    apex. In local coordinates ``(a, b, l)`` (along e1, e2, e3) the LV blood pool and epicardium are
    half-ellipsoids (``l >= 0``), the RV blood pool is an ellipsoid centred at ``a = rv_offset`` minus the LV.
    Contraction ``s(frame) = (1 - cos(2 pi frame / n_frames)) / 2`` is 0 at end-diastole (frame 0) and 1 at
    end-systole (frame ``n_frames / 2``); radii and lengths shrink with ``s`` while myocardial
    cross-sectional area is conserved (wall thickening).

    Attributes:
        origin: (3,) world position of the LV base centre, mm.
        axes: (3, 3) rotation, columns e1, e2, e3 in world coordinates.
        n_frames: frames per cardiac cycle.
        endo_radius, epi_radius: LV endocardial / epicardial radius at the base at end-diastole, mm.
        endo_length, epi_length: LV endocardial / epicardial base-to-apex length at end-diastole, mm.
        rv_offset: RV centre along e1, mm; rv_radii: RV semi-axes along (e1, e2), mm; rv_length: along e3.
        radial_contraction, long_contraction, rv_contraction: fractional shortening at end-systole.
        intensities: (background, LV blood, myocardium, RV blood) base intensities.
        wave_vectors: (M, 3) rad/mm, wave_phases: (M,) - smooth analytic texture sum_m sin(k_m . p + phi_m).
    """

    origin: np.ndarray
    axes: np.ndarray
    n_frames: int
    endo_radius: float
    epi_radius: float
    endo_length: float
    epi_length: float
    rv_offset: float
    rv_radii: tuple[float, float]
    rv_length: float
    radial_contraction: float
    long_contraction: float
    rv_contraction: float
    intensities: tuple[float, float, float, float]
    wave_vectors: np.ndarray
    wave_phases: np.ndarray

    def contraction(self, frame: float) -> float:
        """Contraction state in [0, 1] at ``frame`` (0 at ED, 1 at ES)."""
        return 0.5 * (1.0 - math.cos(2.0 * math.pi * float(frame) / self.n_frames))

    def to_local(self, points_world) -> np.ndarray:
        """World points ``(..., 3)`` -> heart-frame coordinates ``(..., 3)`` = (a, b, l) in mm."""
        return (np.asarray(points_world, dtype=np.float64) - self.origin) @ self.axes

    def sample_scene(self, points_world, frame: float) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate the scene at world points ``(..., 3)`` (mm) and ``frame``.

        Returns ``(intensity float32 (...) in [0, 1], label uint8 (...))`` with labels 0 background,
        1 LV blood pool, 2 myocardium, 3 RV blood pool.
        """
        pts = np.asarray(points_world, dtype=np.float64)
        local = self.to_local(pts)
        a, b, ax_l = local[..., 0], local[..., 1], local[..., 2]
        s = self.contraction(frame)
        ri = self.endo_radius * (1.0 - self.radial_contraction * s)
        ro = math.sqrt(ri**2 + self.epi_radius**2 - self.endo_radius**2)
        lo = self.epi_length * (1.0 - self.long_contraction * s)
        li = lo - (self.epi_length - self.endo_length) * (1.0 + 0.3 * s)
        rv_s = 1.0 - self.rv_contraction * s
        base = ax_l >= 0
        ab2 = a * a + b * b
        endo = base & (ab2 / ri**2 + (ax_l / li) ** 2 <= 1)
        epi = base & (ab2 / ro**2 + (ax_l / lo) ** 2 <= 1)
        rv = ((a - self.rv_offset) / (self.rv_radii[0] * rv_s)) ** 2 + (
            b / (self.rv_radii[1] * rv_s)
        ) ** 2 + (ax_l / (self.rv_length * (1.0 - self.long_contraction * s))) ** 2 <= 1
        rv &= base & ~epi
        label = np.where(endo, 1, np.where(epi, 2, np.where(rv, 3, 0))).astype(np.uint8)
        tex = np.sin(pts @ self.wave_vectors.T + self.wave_phases).sum(-1) * math.sqrt(
            2.0 / len(self.wave_phases)
        )
        base_i = np.asarray(self.intensities, dtype=np.float64)[label]
        gain = np.where(label == 0, 0.25, 0.06)
        intensity = np.clip(base_i * (1.0 + gain * tex), 0.0, 1.0).astype(np.float32)
        return intensity, label

    __call__ = sample_scene


@dataclass(frozen=True, eq=False)
class LaxPlane:
    """One long-axis cine plane.

    Attributes:
        image: float32 ``(T, H, W)`` in [0, 1].
        labels: uint8 ``(T, H, W)`` (0 bg, 1 LV blood pool, 2 myocardium, 3 RV blood pool).
        affine: (4, 4) float64 mapping ``(r, c, 0, 1)`` (row, column, out-of-plane) to world mm; column 0 is
            the long axis (base at the top rows), column 1 the in-plane direction, column 2 the unit normal
            scaled by the pixel spacing (so the matrix is invertible).
        view: "2ch", "3ch" or "4ch".
        angle_deg: rotation of the plane about the long axis, measured from the RV direction e1.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    view: str
    angle_deg: float


@dataclass(frozen=True, eq=False)
class CardiacPhantom:
    """Beating-heart cine phantom; SAX and LAX images are point samples of the same :class:`CardiacScene`.

    Attributes:
        sax: float32 ``(T, S, H, W)`` short-axis cine stack in [0, 1] (frames, slices, rows, columns).
        sax_labels: uint8 ``(T, S, H, W)`` (0 bg, 1 LV blood pool, 2 myocardium, 3 RV blood pool).
        sax_affine: (4, 4) float64 mapping the voxel index ``(s, h, w, 1)`` - in array order, slice first,
            unlike NIfTI's (i, j, k) = (column, row, slice) - to world mm. Slices run base to apex along the
            long axis; the RV appears on the image left.
        lax: view name ("2ch", "3ch", "4ch") -> :class:`LaxPlane`.
        scene: the analytic scene; ``scene.sample_scene(points, frame)`` (or ``scene(points, frame)``).
        pixel_spacing: in-plane pixel size, mm (SAX and LAX).
        slice_spacing: SAX slice distance, mm.
        ed_frame: end-diastolic frame (0); es_frame: end-systolic frame (``n_frames // 2``).
    """

    sax: np.ndarray
    sax_labels: np.ndarray
    sax_affine: np.ndarray
    lax: dict[str, LaxPlane]
    scene: CardiacScene
    pixel_spacing: float
    slice_spacing: float
    ed_frame: int
    es_frame: int

    def sample_scene(self, points_world, frame: float) -> tuple[np.ndarray, np.ndarray]:
        """Shortcut for ``self.scene.sample_scene(points_world, frame)``."""
        return self.scene.sample_scene(points_world, frame)


def _render(
    scene: CardiacScene, affine: np.ndarray, shape: tuple[int, ...], n_frames: int, noise: float, rng
):
    """Sample ``scene`` at every voxel centre of a grid (index order = array order) through ``affine``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, len(shape))
    idx3 = np.zeros((idx.shape[0], 3))
    idx3[:, : len(shape)] = idx
    pts = idx3 @ affine[:3, :3].T + affine[:3, 3]
    imgs, labs = [], []
    for t in range(n_frames):
        img, lab = scene.sample_scene(pts, t)
        if noise > 0:
            img = np.clip(_rician(img.astype(np.float64), noise, rng), 0.0, 1.0).astype(np.float32)
        imgs.append(img.reshape(shape))
        labs.append(lab.reshape(shape))
    return np.stack(imgs), np.stack(labs)


def cardiac_cine(
    n_frames: int = 4,
    n_slices: int = 8,
    size: int = 32,
    slice_spacing: float = 8.0,
    pixel_spacing: float = 1.5,
    seed: int = 0,
    lax_size: int | tuple[int, int] | None = None,
    noise: float = 0.0,
) -> CardiacPhantom:
    """Beating-heart cine phantom: short-axis stack plus 2ch/3ch/4ch long-axis planes.

    An obliquely oriented (seeded) heart with a half-ellipsoidal LV (blood pool + myocardial shell) and a
    crescent RV wrapped around the septal side. The anatomy is scaled to fit both the in-plane field of view
    ``size * pixel_spacing`` and the stack extent ``n_slices * slice_spacing`` with a realistic length/width
    ratio (apical slices may lie beyond the apex). SAX slices sit at ``l = (s + 1/2) * slice_spacing`` from
    the base; LAX planes contain the long axis (4ch through both
    ventricles, 2ch through the LV only, 3ch in between). ``lax_size`` is the LAX image size (int for
    square, or (H, W)); by default it is square and large enough for 1.2 times the stack extent. With
    ``noise=0`` every pixel equals ``scene.sample_scene`` at ``affine @ index``.
    """
    if n_frames < 1 or n_slices < 1 or size < 8:
        raise ValueError(f"need n_frames >= 1, n_slices >= 1, size >= 8; got {n_frames}, {n_slices}, {size}")
    rng = np.random.default_rng(seed)
    fov = size * pixel_spacing
    extent = n_slices * slice_spacing
    e3 = np.array([0.55, -0.45, -0.7]) + rng.normal(0.0, 0.08, 3)
    e3 /= np.linalg.norm(e3)
    ref = np.array([0.0, 0.0, 1.0])
    e1 = ref - (ref @ e3) * e3
    e1 /= np.linalg.norm(e1)
    psi = rng.uniform(-0.3, 0.3)
    e1 = math.cos(psi) * e1 + math.sin(psi) * np.cross(e3, e1)
    e2 = np.cross(e3, e1)
    axes = np.stack([e1, e2, e3], axis=1)
    origin = np.array([10.0, -15.0, 25.0]) + rng.normal(0.0, 3.0, 3)
    epi_r = min(0.25 * fov, extent / 3.5) * rng.uniform(0.95, 1.0)
    endo_r = epi_r * rng.uniform(0.6, 0.65)
    epi_l = min(extent - 0.3 * slice_spacing, 4.2 * epi_r)  # realistic length / width ratio
    n_waves = 6
    k_dir = rng.normal(size=(n_waves, 3))
    k_dir /= np.linalg.norm(k_dir, axis=1, keepdims=True)
    scene = CardiacScene(
        origin=origin,
        axes=axes,
        n_frames=int(n_frames),
        endo_radius=float(endo_r),
        epi_radius=float(epi_r),
        endo_length=float(epi_l - 0.8 * (epi_r - endo_r)),
        epi_length=float(epi_l),
        rv_offset=float(0.95 * epi_r),
        rv_radii=(float(0.85 * epi_r), float(1.45 * epi_r * rng.uniform(0.95, 1.05))),
        rv_length=float(0.8 * epi_l),
        radial_contraction=0.22,
        long_contraction=0.12,
        rv_contraction=0.2,
        intensities=(0.12, 0.9, 0.32, 0.82),
        wave_vectors=k_dir * (2.0 * math.pi / rng.uniform(15.0, 30.0, (n_waves, 1))),
        wave_phases=rng.uniform(0.0, 2.0 * math.pi, n_waves),
    )
    shift = 0.4 * epi_r  # centre the field of view between LV and RV

    row_dir, col_dir = e2, -e1  # RV (towards +e1) on the image left
    centre = origin + 0.5 * slice_spacing * e3 + shift * e1
    sax_affine = np.eye(4)
    sax_affine[:3, 0] = slice_spacing * e3
    sax_affine[:3, 1] = pixel_spacing * row_dir
    sax_affine[:3, 2] = pixel_spacing * col_dir
    sax_affine[:3, 3] = centre - (size - 1) / 2 * pixel_spacing * (row_dir + col_dir)
    sax, sax_labels = _render(scene, sax_affine, (n_slices, size, size), n_frames, noise, rng)

    if lax_size is None:
        side = max(size, math.ceil(1.2 * extent / pixel_spacing))
        lax_hw = (side, side)
    elif isinstance(lax_size, int):
        lax_hw = (lax_size, lax_size)
    else:
        lax_hw = (int(lax_size[0]), int(lax_size[1]))
    lax = {}
    for view, ang in _LAX_ANGLES.items():
        th = math.radians(ang)
        v = math.cos(th) * e1 + math.sin(th) * e2
        normal = np.cross(e3, v)
        c = origin + 0.5 * extent * e3 + shift * math.cos(th) * v
        aff = np.eye(4)
        aff[:3, 0] = pixel_spacing * e3
        aff[:3, 1] = pixel_spacing * v
        aff[:3, 2] = pixel_spacing * normal
        aff[:3, 3] = c - (lax_hw[0] - 1) / 2 * pixel_spacing * e3 - (lax_hw[1] - 1) / 2 * pixel_spacing * v
        img, lab = _render(scene, aff, lax_hw, n_frames, noise, rng)
        lax[view] = LaxPlane(img, lab, aff, view, ang)
    return CardiacPhantom(
        sax=sax,
        sax_labels=sax_labels,
        sax_affine=sax_affine,
        lax=lax,
        scene=scene,
        pixel_spacing=float(pixel_spacing),
        slice_spacing=float(slice_spacing),
        ed_frame=0,
        es_frame=int(n_frames) // 2,
    )


# ----------------------------------------------------------------------------------------------------------
# (d) labelled anatomy for deformation / registration / segmentation tests
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LabelledImage:
    """Image with labelled structures.

    Attributes:
        image: float32 ``(H, W)`` or ``(D, H, W)`` in [0, 1].
        labels: int64, same shape; 0 background, 1 outer body, 2..n_labels nested/adjacent structures.
        n_labels: number of foreground labels (all of 1..n_labels are present).
    """

    image: np.ndarray
    labels: np.ndarray
    n_labels: int


def labelled_anatomy(shape: Sequence[int] = (64, 64), n_labels: int = 3, seed: int = 0) -> LabelledImage:
    """Smooth nested/adjacent blob structures with distinct intensities, 2D or 3D by ``len(shape)``.

    Label 1 is a bumpy body ellipse(oid); labels 2, 4, ... are adjacent blobs arranged around its centre and
    labels 3, 5, ... sit nested inside the preceding blob. Each label gets a distinct intensity level plus a
    smooth texture, and the image is lightly smoothed. Every label 1..n_labels is guaranteed present.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 4:
        raise ValueError(f"shape must be 2D or 3D with every size >= 4, got {shape}")
    if n_labels < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    rng = np.random.default_rng(seed)
    nd = len(shape)
    coords = _grid(shape)
    sig = np.asarray(shape, dtype=np.float64)
    labels = np.zeros(shape, np.int64)

    def blob(centre, radii, bump):
        rho = np.sqrt(_ellipsoid(coords, centre, radii))
        return rho + bump * smooth_noise(shape, rng, sig / 10) <= 1

    centres = [np.zeros(nd) + rng.uniform(-0.03, 0.03, nd)]
    labels[blob(centres[0], rng.uniform(0.72, 0.85, nd), 0.06)] = 1
    m = n_labels - 1
    n_parents = math.ceil(m / 2)
    ring = 0.0 if n_parents == 1 else 0.35
    r_parent = 0.38 if n_parents == 1 else min(0.32, 0.95 * ring * math.sin(math.pi / n_parents))
    start = rng.uniform(0, 2 * math.pi)
    for k in range(2, n_labels + 1):
        j = k - 2
        if j % 2 == 0:  # an adjacent blob on a ring around the body centre
            ang = start + 2 * math.pi * (j // 2) / n_parents
            c = np.zeros(nd)
            c[-2:] = ring * math.sin(ang), ring * math.cos(ang)
            c += rng.uniform(-0.03, 0.03, nd)
            parent_c = c
            radii = r_parent * rng.uniform(0.85, 1.0, nd)
            mask = blob(c, radii, 0.05) & (labels >= 1)
        else:  # nested inside the preceding blob
            c = parent_c + rng.uniform(-0.1, 0.1, nd) * r_parent
            radii = 0.5 * r_parent * rng.uniform(0.85, 1.0, nd)
            mask = blob(c, radii, 0.04) & (labels == k - 1)
        centres.append(c)
        labels[mask] = k
    # guarantee presence: give a missing label the voxel nearest its centre among labels that can spare one
    for k in range(1, n_labels + 1):
        counts = np.bincount(labels.ravel(), minlength=n_labels + 1)
        if counts[k] > 0:
            continue
        dist = _ellipsoid(coords, centres[k - 1], [1.0] * nd)
        dist = np.where(counts[labels] >= 2, dist, np.inf)
        labels[np.unravel_index(int(np.argmin(dist)), shape)] = k

    levels = np.concatenate([[0.05], rng.permutation(np.linspace(0.3, 0.95, n_labels))])
    image = levels[labels] + 0.035 * smooth_noise(shape, rng, sig / 12) * (labels > 0)
    image = np.clip(_blur(image, 0.6), 0.0, 1.0).astype(np.float32)
    return LabelledImage(image, labels, int(n_labels))


# ----------------------------------------------------------------------------------------------------------
# (e) class-labelled CT/MR-like volumes
# ----------------------------------------------------------------------------------------------------------
CLASS_NAMES: tuple[str, ...] = ("chest CT", "brain MR", "abdomen CT", "pelvis CT")
"""Classes of :func:`classed_volumes`, in label order."""

_CT_WINDOW = (-400.0, 400.0)


@dataclass(frozen=True, eq=False)
class ClassedVolumes:
    """Class-labelled small volumes.

    Attributes:
        volumes: float32 ``(n, D, H, W)`` in [-1, 1].
        labels: int64 ``(n,)`` class indices, cycling ``0, 1, ..., n_classes - 1, 0, ...``.
        class_names: name of each class index.
    """

    volumes: np.ndarray
    labels: np.ndarray
    class_names: list[str]


def _ct(hu: np.ndarray) -> np.ndarray:
    lo, hi = _CT_WINDOW
    return np.clip((hu - lo) / (hi - lo), 0.0, 1.0)


def _torso(shape, rng, axes_yx):
    """HU volume of an elliptic-cylinder torso with fat rim, plus coordinates and the inner mask."""
    z, y, x = _grid(shape)
    ay, ax = axes_yx[0] * rng.uniform(0.93, 1.07), axes_yx[1] * rng.uniform(0.95, 1.05)
    taper = 1.0 - 0.05 * z  # slightly wider towards the top
    cy = rng.uniform(-0.04, 0.04)
    body = ((y - cy) / (ay * taper)) ** 2 + (x / (ax * taper)) ** 2 <= 1
    rim = rng.uniform(0.06, 0.12)
    inner = ((y - cy) / (ay * taper - rim)) ** 2 + (x / (ax * taper - rim)) ** 2 <= 1
    hu = np.full(shape, -1000.0)
    hu[body] = -100.0
    hu[inner] = 45.0
    return hu, (z, y, x), inner, cy + ay * 0.62


def _chest(shape, rng):
    hu, (z, y, x), inner, sy = _torso(shape, rng, (0.58, 0.9))
    for side in (-1.0, 1.0):
        lung = _ellipsoid((z, y, x), (0.05, -0.05, side * 0.42), (0.95, 0.42, 0.3 * rng.uniform(0.9, 1.1)))
        hu[(lung <= 1) & inner] = -850.0
    hu[_ellipsoid((z, y, x), (-0.2, -0.12, 0.08), (0.5, 0.26, 0.24)) <= 1] = 40.0  # heart
    hu[_ellipsoid((z, y, x), (0.0, -0.05, 0.05), (2.0, 0.06, 0.06)) <= 1] = 45.0  # descending vessel
    hu[_ellipsoid((z, y, x), (0.0, sy, 0.0), (2.0, 0.1, 0.1)) <= 1] = 700.0  # spine
    hu[_ellipsoid((z, y, x), (0.0, -0.55, 0.0), (2.0, 0.04, 0.08)) <= 1] = 500.0  # sternum
    return _ct(hu)


def _abdomen(shape, rng):
    hu, (z, y, x), inner, sy = _torso(shape, rng, (0.62, 0.9))
    hu[inner] = 15.0  # bowel and mesenteric fat
    hu[(_ellipsoid((z, y, x), (0.25, -0.08, -0.36), (0.9, 0.4, 0.36)) <= 1) & inner] = 110.0  # liver
    hu[(_ellipsoid((z, y, x), (0.3, 0.05, 0.55), (0.6, 0.2, 0.12)) <= 1) & inner] = 120.0  # spleen
    for side in (-1.0, 1.0):
        kidney = _ellipsoid((z, y, x), (-0.15, sy - 0.02, side * 0.34), (0.5, 0.12, 0.08))
        hu[(kidney <= 1) & inner] = 170.0
        hu[(kidney <= 0.35) & inner] = 20.0  # renal pelvis
    hu[_ellipsoid((z, y, x), (0.0, sy, 0.0), (2.0, 0.1, 0.11)) <= 1] = 700.0  # spine
    hu[_ellipsoid((z, y, x), (0.0, sy - 0.17, 0.05), (2.0, 0.045, 0.045)) <= 1] = 250.0  # aorta
    return _ct(hu)


def _pelvis(shape, rng):
    hu, (z, y, x), inner, sy = _torso(shape, rng, (0.55, 0.93))
    hu[(_ellipsoid((z, y, x), (0.1, -0.25, 0.0), (0.45, 0.22, 0.25)) <= 1) & inner] = 5.0  # bladder
    for side in (-1.0, 1.0):
        head = _ellipsoid((z, y, x), (-0.1, 0.05, side * 0.5), (0.22, 0.18, 0.18))
        hu[(head <= 1) & inner] = 900.0
        hu[(head <= 0.45) & inner] = 300.0  # marrow
        hu[(_ellipsoid((z, y, x), (0.55, 0.25, side * 0.45), (0.5, 0.1, 0.3)) <= 1) & inner] = 600.0  # iliac
    hu[_ellipsoid((z, y, x), (0.3, sy, 0.0), (0.7, 0.09, 0.16)) <= 1] = 650.0  # sacrum
    return _ct(hu)


def _brain_mr(shape, rng):
    lab = _brain_labels(shape, rng)
    t1, t2, pd = _brain_maps(lab, rng)
    s = _brain_signal("T1w", t1, t2, pd)
    return s / s.max()


_CLASS_MAKERS = (_chest, _brain_mr, _abdomen, _pelvis)


def classed_volumes(
    n: int = 4, shape: Sequence[int] = (32, 32, 32), n_classes: int = 2, seed: int = 0
) -> ClassedVolumes:
    """Small CT/MR-like volumes whose class is visible from the structure (see :data:`CLASS_NAMES`).

    Class 0 chest CT (torso with two dark lungs, heart, bright spine), 1 brain MR (T1-weighted head with
    ventricles), 2 abdomen CT (liver, spleen, kidneys, spine, aorta), 3 pelvis CT (bladder, femoral heads,
    iliac bones, sacrum); CT values are mapped from [-400, 400] HU. Labels cycle over ``n``; sample ``i`` depends only on
    ``(seed, i)`` so a larger ``n`` extends a smaller one. Each volume gets a smooth texture and a little
    white noise and is mapped to [-1, 1].
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3D with every size >= 4, got {shape}")
    if not 1 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes must be in 1..{len(CLASS_NAMES)}, got {n_classes}")
    labels = np.arange(n, dtype=np.int64) % n_classes
    vols = np.empty((n, *shape), np.float32)
    sig = np.asarray(shape, dtype=np.float64) / 16
    for i, cls in enumerate(labels):
        rng = np.random.default_rng([seed, i])
        v = _CLASS_MAKERS[cls](shape, rng)
        v = v * (1.0 + 0.04 * smooth_noise(shape, rng, sig)) + 0.01 * rng.standard_normal(shape)
        vols[i] = np.clip(v, 0.0, 1.0) * 2.0 - 1.0
    return ClassedVolumes(vols, labels, list(CLASS_NAMES[:n_classes]))

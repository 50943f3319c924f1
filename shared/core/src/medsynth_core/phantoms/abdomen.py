"""Multi-phase contrast-enhanced abdominal slices (:func:`contrast_phase_slices`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from medsynth_core.phantoms._common import _check_names, _ellipse, _grid, _rician, _segment_dist, smooth_noise

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

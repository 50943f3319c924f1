"""Class-labelled CT/MR-like volumes whose class (body region / modality) is visible."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth_core.phantoms._common import _ellipsoid, _grid, smooth_noise
from medsynth_core.phantoms.brain import _brain_labels, _brain_maps, _brain_signal

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

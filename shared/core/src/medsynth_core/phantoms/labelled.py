"""Labelled anatomy for deformation / registration / segmentation tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medsynth_core.phantoms._common import _blur, _ellipsoid, _grid, smooth_noise


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


def labelled_anatomy(
    shape: Sequence[int] = (64, 64),
    n_labels: int = 3,
    seed: int = 0,
    texture: float = 0.0,
    texture_sigma: float = 1.0,
) -> LabelledImage:
    """Smooth nested/adjacent blob structures with distinct intensities, 2D or 3D by ``len(shape)``.

    Label 1 is a bumpy body ellipse(oid); labels 2, 4, ... are adjacent blobs arranged around its centre and
    labels 3, 5, ... sit nested inside the preceding blob. Each label gets a distinct intensity level plus a
    smooth texture, and the image is lightly smoothed. Every label 1..n_labels is guaranteed present.

    ``texture > 0`` adds tissue texture, like MR tissue texture, so that the image has gradients almost
    everywhere (a deformation is observable only where the image is not flat): every label, background
    included, gets its own band-limited random field (white noise low-passed by a Gaussian of
    ``texture_sigma`` voxels, unit std) times ``texture``, added to its level; the image is then min-max
    scaled to [0, 1] (no clipping). Aperiodic within the image (unlike a tag grid, it is not ambiguous modulo a
    period). The texture draws come from a separate generator (``seed``, 1), so labels and the image without
    texture are unchanged; ``texture=0`` (default) is the original phantom bit for bit.
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
    if texture < 0 or texture_sigma <= 0:
        raise ValueError(f"texture must be >= 0 and texture_sigma > 0, got {texture}, {texture_sigma}")
    if texture > 0:
        trng = np.random.default_rng([int(seed), 1])
        for k in range(n_labels + 1):
            field = smooth_noise(shape, trng, texture_sigma)
            image = image + texture * field * (labels == k)
        image = _blur(image, 0.6)
        image = ((image - image.min()) / max(float(image.max() - image.min()), 1e-12)).astype(np.float32)
        return LabelledImage(image, labels, int(n_labels))
    image = np.clip(_blur(image, 0.6), 0.0, 1.0).astype(np.float32)
    return LabelledImage(image, labels, int(n_labels))

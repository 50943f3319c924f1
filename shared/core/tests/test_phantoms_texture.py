"""labelled_anatomy(texture=...): tissue texture so that deformations are observable almost everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from medsynth_core import phantoms as P


def _flat_fraction(image: np.ndarray, thr: float = 0.01) -> float:
    grads = np.gradient(image.astype(np.float64))
    return float((np.sqrt(sum(g**2 for g in grads)) < thr).mean())


def test_texture_zero_is_the_original_phantom():
    for shape in ((32, 32), (16, 16, 16)):
        a = P.labelled_anatomy(shape, n_labels=3, seed=4)
        b = P.labelled_anatomy(shape, n_labels=3, seed=4, texture=0.0, texture_sigma=2.0)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)


@pytest.mark.parametrize("shape", [(32, 32), (16, 16, 16)])
def test_texture_removes_flat_regions_and_keeps_labels(shape):
    flat = P.labelled_anatomy(shape, n_labels=3, seed=3)
    tex = P.labelled_anatomy(shape, n_labels=3, seed=3, texture=0.08)
    assert np.array_equal(flat.labels, tex.labels)  # texture draws from its own generator
    assert tex.image.dtype == np.float32 and tex.image.min() == 0.0 and tex.image.max() == pytest.approx(1.0)
    assert _flat_fraction(flat.image) > 0.25  # background and tissue interiors are flat without texture
    assert _flat_fraction(tex.image) < 0.12
    # tissues stay distinguishable: mean intensity per label still differs
    means = sorted(float(tex.image[tex.labels == k].mean()) for k in range(4))
    assert min(np.diff(means)) > 0.02
    again = P.labelled_anatomy(shape, n_labels=3, seed=3, texture=0.08)
    other = P.labelled_anatomy(shape, n_labels=3, seed=5, texture=0.08)
    assert np.array_equal(tex.image, again.image) and not np.array_equal(tex.image, other.image)


def test_texture_is_not_periodic_at_small_lags():
    """Band-limited random texture, not a tag grid: its autocorrelation decays and never comes back near 1."""
    img = P.labelled_anatomy((64, 64), n_labels=3, seed=0, texture=0.3).image.astype(np.float64)
    smooth = P.labelled_anatomy((64, 64), n_labels=3, seed=0).image.astype(np.float64)
    r = img - smooth * (img.std() / max(smooth.std(), 1e-12))  # roughly the texture part
    r = r[8:-8, 8:-8] - r[8:-8, 8:-8].mean()
    ac = [float((r[:, : r.shape[1] - k] * r[:, k:]).mean() / r.var()) for k in range(1, 12)]
    assert ac[0] > ac[3] and max(ac[3:]) < 0.6


def test_texture_rejects_bad_values():
    with pytest.raises(ValueError):
        P.labelled_anatomy((16, 16), texture=-0.1)
    with pytest.raises(ValueError):
        P.labelled_anatomy((16, 16), texture=0.1, texture_sigma=0.0)

"""cardiac_cine additions: the SAX stack offset along the long axis (``slice_offset``)."""

import numpy as np

from medsynth_core.phantoms import cardiac_cine


def test_slice_offset_moves_only_the_sax_stack():
    a = cardiac_cine(n_frames=2, n_slices=5, size=16, seed=3, pixel_spacing=2.25)
    b = cardiac_cine(n_frames=2, n_slices=5, size=16, seed=3, pixel_spacing=2.25, slice_offset=-7.0)
    e3 = a.scene.axes[:, 2]
    np.testing.assert_allclose(b.sax_affine[:3, 3] - a.sax_affine[:3, 3], -7.0 * e3, atol=1e-12)
    np.testing.assert_array_equal(b.sax_affine[:3, :3], a.sax_affine[:3, :3])
    for v in a.lax:  # anatomy and LAX planes unchanged
        np.testing.assert_array_equal(a.lax[v].image, b.lax[v].image)
    # the default (0) is the old stack: l = (s + 1/2) * spacing from the base
    loc = a.scene.to_local(a.sax_affine[:3, 3] + a.sax_affine[:3, 2] * 0)
    assert abs(loc[2] - 4.0) < 1e-9
    # offset -7 mm puts the first slice above the base plane (l = 4 - 7 < 0): background only there
    assert b.sax_labels[0, 0].max() == 0 and a.sax_labels[0, 0].max() > 0
    assert b.sax_labels[0, 1].max() > 0
    # each SAX pixel is the scene sampled at its world point
    idx = np.array([2.0, 7.0, 9.0, 1.0])
    val, lab = b.scene.sample_scene((b.sax_affine @ idx)[:3], 0)
    assert abs(float(val) - float(b.sax[0, 2, 7, 9])) < 1e-6 and int(lab) == int(b.sax_labels[0, 2, 7, 9])


def test_supersample_averages_each_pixel_footprint():
    """``supersample=s``: every SAX/LAX pixel is the mean of an s x s lattice inside its in-plane footprint
    (partial volume at edges); labels stay those of the pixel centre; s = 1 is the point-sampled phantom."""
    from medsynth_core.phantoms.cardiac import render_grid

    kw = dict(n_frames=2, n_slices=4, size=16, seed=5, pixel_spacing=2.0)
    p1 = cardiac_cine(**kw)
    p3 = cardiac_cine(**kw, supersample=3)
    assert p1.supersample == 1 and p3.supersample == 3
    np.testing.assert_array_equal(p1.sax_labels, p3.sax_labels)
    assert not np.allclose(p1.sax, p3.sax) and 0.0 <= p3.sax.min() and p3.sax.max() <= 1.0
    # pixel (frame 1, slice 2, row 7, column 9) by hand: 9 points at +-1/3 pixel along rows and columns
    a = p3.sax_affine
    pts = [
        a[:3, :3] @ [2.0, 7 + du, 9 + dv] + a[:3, 3] for du in (-1 / 3, 0, 1 / 3) for dv in (-1 / 3, 0, 1 / 3)
    ]
    want = p3.scene.sample_scene(np.array(pts), 1)[0].astype(np.float64).mean()
    assert abs(float(p3.sax[1, 2, 7, 9]) - want) < 1e-6
    # the same for a LAX pixel (2D grid: both axes in-plane)
    la = p3.lax["4ch"]
    pts = [
        la.affine[:3, :3] @ [10 + du, 4 + dv, 0] + la.affine[:3, 3]
        for du in (-1 / 3, 0, 1 / 3)
        for dv in (-1 / 3, 0, 1 / 3)
    ]
    want = p3.scene.sample_scene(np.array(pts), 0)[0].astype(np.float64).mean()
    assert abs(float(la.image[0, 10, 4]) - want) < 1e-6
    # render_grid reproduces the stacks (s = 1: plain point samples) and renders other grids the same way
    img, lab = render_grid(p3.scene, p3.sax_affine, p3.sax.shape[1:], 1, p3.supersample)
    np.testing.assert_allclose(img, p3.sax[1], atol=1e-6)
    np.testing.assert_array_equal(lab, p3.sax_labels[1])
    img1, _ = render_grid(p1.scene, p1.sax_affine, p1.sax.shape[1:], 0)
    np.testing.assert_array_equal(img1, p1.sax[0])
    # edges blend, flat regions do not: the change is confined to pixels next to a label boundary
    lab0 = p1.sax_labels[0, 1]
    edge = np.zeros_like(lab0, bool)
    edge[:-1] |= lab0[:-1] != lab0[1:]
    edge[1:] |= lab0[:-1] != lab0[1:]
    edge[:, :-1] |= lab0[:, :-1] != lab0[:, 1:]
    edge[:, 1:] |= lab0[:, :-1] != lab0[:, 1:]
    diff = np.abs(p3.sax[0, 1] - p1.sax[0, 1])
    assert diff[edge].mean() > 5 * diff[~edge].mean()
    try:
        cardiac_cine(**kw, supersample=0)
    except ValueError as exc:
        assert "supersample" in str(exc)
    else:
        raise AssertionError("supersample=0 accepted")

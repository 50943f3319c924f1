"""Tests for medsynth_core.phantoms: determinism, ranges, shapes, timing and physical/geometric sanity."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from medsynth_core import phantoms as P


def _best_time(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------------------------ helpers
def test_smooth_noise_stats_and_determinism():
    for shape, sigma in (((32, 48), 3.0), ((8, 12, 16), (1.0, 2.0, 0.5))):
        a = P.smooth_noise(shape, np.random.default_rng(1), sigma)
        assert a.shape == shape and a.dtype == np.float32
        assert abs(float(a.mean())) < 1e-5 and abs(float(a.std()) - 1.0) < 1e-4
        assert np.array_equal(a, P.smooth_noise(shape, np.random.default_rng(1), sigma))
        assert not np.array_equal(a, P.smooth_noise(shape, np.random.default_rng(2), sigma))
    # larger sigma -> smoother (smaller mean absolute neighbour difference)
    rough = P.smooth_noise((64, 64), np.random.default_rng(0), 1.0)
    smooth = P.smooth_noise((64, 64), np.random.default_rng(0), 4.0)
    assert np.abs(np.diff(smooth, axis=1)).mean() < 0.5 * np.abs(np.diff(rough, axis=1)).mean()


def test_generators_fast_at_demo_size():
    gens = {
        "phases": lambda: P.contrast_phase_slices(),
        "brain": lambda: P.brain_volumes(),
        "cardiac": lambda: P.cardiac_cine(),
        "anatomy2d": lambda: P.labelled_anatomy((64, 64)),
        "anatomy3d": lambda: P.labelled_anatomy((32, 32, 32)),
        "classed": lambda: P.classed_volumes(),
    }
    for name, fn in gens.items():
        assert _best_time(fn) < 0.5, name


# ------------------------------------------------------------------------------------- (a) contrast phases
def test_phase_slices_determinism_shapes_ranges():
    a = P.contrast_phase_slices(n=3, size=48, phases=("venous", "pre"), seed=5)
    b = P.contrast_phase_slices(n=3, size=48, phases=("venous", "pre"), seed=5)
    c = P.contrast_phase_slices(n=3, size=48, phases=("venous", "pre"), seed=6)
    assert list(a.images) == ["venous", "pre"] and a.phases == ("venous", "pre")
    for ph in a.phases:
        img = a.images[ph]
        assert img.shape == (3, 48, 48) and img.dtype == np.float32
        assert img.min() >= 0.0 and img.max() <= 1.0
        assert np.array_equal(img, b.images[ph])
        assert not np.array_equal(img, c.images[ph])
    for m in (a.lesion_mask, a.liver_mask, a.body_mask):
        assert m.shape == (3, 48, 48) and m.dtype == np.bool_
    assert np.array_equal(a.tissue, b.tissue)
    assert a.tissue.dtype == np.uint8 and a.tissue.max() < len(P.ABDOMEN_TISSUES)
    # masks are consistent: lesions inside the liver, liver inside the body; every slice has a lesion
    assert not (a.lesion_mask & ~a.liver_mask).any() and not (a.liver_mask & ~a.body_mask).any()
    assert a.lesion_mask.any(axis=(1, 2)).all()
    # different anatomy across slices
    assert not np.array_equal(a.tissue[0], a.tissue[1])


def test_phase_slices_enhancement_and_shared_geometry():
    d = P.contrast_phase_slices(n=6, size=64, seed=0)
    tid = {name: i for i, name in enumerate(P.ABDOMEN_TISSUES)}

    def mean(ph, tissue):
        return float(d.images[ph][d.tissue == tid[tissue]].mean())

    liver = {ph: mean(ph, "liver") for ph in P.PHASE_NAMES}
    hyper = {ph: mean(ph, "lesion_hyper") for ph in P.PHASE_NAMES}
    cyst = {ph: mean(ph, "lesion_cyst") for ph in P.PHASE_NAMES}
    # hyper-enhancing lesion: lesion/liver ratio high in arterial, washout in delay
    assert hyper["arterial"] / liver["arterial"] > 1.2 * hyper["delay"] / liver["delay"]
    assert hyper["arterial"] > liver["arterial"] and hyper["delay"] < liver["delay"]
    # cyst never enhances; liver peaks in venous; aorta brightest in arterial
    assert max(cyst.values()) - min(cyst.values()) < 0.02
    assert max(liver, key=liver.get) == "venous"
    aorta = {ph: mean(ph, "aorta") for ph in P.PHASE_NAMES}
    assert max(aorta, key=aorta.get) == "arterial" and aorta["arterial"] > 0.95
    # lesion mask (all kinds) differs from liver more in arterial than in delay
    les, par = d.lesion_mask, d.tissue == tid["liver"]
    ratio = {ph: d.images[ph][les].mean() / d.images[ph][par].mean() for ph in ("arterial", "delay")}
    assert ratio["arterial"] > ratio["delay"]
    # geometry shared by the phases: thresholding any phase recovers the same body outline
    for ph in P.PHASE_NAMES:
        assert ((d.images[ph] > 0.08) == d.body_mask).mean() > 0.99


def test_phase_slices_unknown_phase():
    with pytest.raises(ValueError, match="arterial"):
        P.contrast_phase_slices(phases=("pre", "hepatobiliary"))
    with pytest.raises(ValueError):
        P.contrast_phase_slices(phases=("pre", "pre"))


# ---------------------------------------------------------------------------------------------- (b) brain
def test_brain_determinism_shapes_ranges():
    shape = (24, 20, 28)
    a = P.brain_volumes(shape, seed=3, thick_factor=4)
    b = P.brain_volumes(shape, seed=3, thick_factor=4)
    c = P.brain_volumes(shape, seed=4, thick_factor=4)
    assert set(a.images) == {"T1w", "T2w", "PD", "FLAIR"}
    for k, img in a.images.items():
        assert img.shape == shape and img.dtype == np.float32
        assert img.min() >= 0.0 and img.max() == pytest.approx(1.0)
        assert np.array_equal(img, b.images[k]) and not np.array_equal(img, c.images[k])
        assert a.thick[k].shape == (6, 20, 28) and a.thick[k].dtype == np.float32
    assert a.tissue.shape == shape and a.tissue.dtype == np.int64
    assert set(np.unique(a.tissue)) == {0, 1, 2, 3, 4}
    for m in (a.t1, a.t2, a.pd):
        assert m.shape == shape and m.dtype == np.float32
    assert a.spacing == (10.0, 12.0, 240.0 / 28)
    assert a.thick_spacing == (40.0, 12.0, 240.0 / 28)
    assert (a.head_mask | (a.tissue == 0)).all() and a.head_mask.sum() > (a.tissue > 0).sum()
    with pytest.raises(ValueError, match="FLAIR"):
        P.brain_volumes(contrasts=("T1w", "DWI"))


def test_brain_contrasts_follow_signal_equations():
    ph = P.brain_volumes((32, 32, 32), seed=0, noise=0.0)
    m = {k: [float(img[ph.tissue == t].mean()) for t in range(5)] for k, img in ph.images.items()}
    csf, gm, wm, les = 1, 2, 3, 4
    assert m["FLAIR"][csf] < 0.5 * m["FLAIR"][wm]  # CSF nulled
    assert m["FLAIR"][les] > m["FLAIR"][gm] > m["FLAIR"][wm]  # lesion bright on FLAIR
    assert m["T2w"][csf] > m["T2w"][gm] > m["T2w"][wm]
    assert m["T1w"][wm] > m["T1w"][gm] > m["T1w"][csf]
    assert m["PD"][gm] > m["PD"][wm]
    # images are exactly the documented equations applied to the parameter maps (then max-normalised)
    t1, t2, pd = (x.astype(np.float64) for x in (ph.t1, ph.t2, ph.pd))
    for k, seq in ph.sequences.items():
        if "TI" in seq:
            s = P.inversion_recovery_signal(pd, t1, t2, seq["TR"], seq["TE"], seq["TI"])
        else:
            s = P.spin_echo_signal(pd, t1, t2, seq["TR"], seq["TE"])
        np.testing.assert_allclose(ph.images[k], s / s.max(), atol=2e-4)
    assert ph.sequences["T1w"]["TR"] < ph.sequences["T2w"]["TR"]
    assert ph.sequences["T1w"]["TE"] < ph.sequences["T2w"]["TE"]
    assert ph.sequences["PD"]["TE"] < ph.sequences["T2w"]["TE"]
    flair = P.BRAIN_SEQUENCES["FLAIR"]
    t1_csf, t2_csf, _ = P.BRAIN_TISSUE_PARAMS["CSF"]
    assert P.inversion_recovery_signal(1.0, t1_csf, t2_csf, flair["TR"], flair["TE"], flair["TI"]) < 1e-9


def test_thick_slices_block_average_and_pick():
    ph = P.brain_volumes((32, 24, 20), seed=1, contrasts=("T2w",), thick_factor=4, thick_axis=0)
    vol = ph.images["T2w"]
    manual = np.stack([vol[4 * i : 4 * i + 4].mean(axis=0) for i in range(8)])
    assert ph.thick["T2w"].shape == (8, 24, 20)
    np.testing.assert_allclose(ph.thick["T2w"], manual, atol=1e-6)
    # other axis, remainder dropped, pick mode, torch
    ph1 = P.brain_volumes((16, 26, 16), seed=1, contrasts=("PD",), thick_factor=3, thick_axis=1)
    v1 = ph1.images["PD"]
    assert ph1.thick["PD"].shape == (16, 8, 16)
    np.testing.assert_allclose(ph1.thick["PD"][:, 2], v1[:, 6:9].mean(axis=1), atol=1e-6)
    assert ph1.thick_spacing[1] == pytest.approx(3 * ph1.spacing[1])
    picked = P.thick_slices(v1, 3, axis=1, mode="pick")
    assert np.array_equal(picked, v1[:, 1:24:3])
    tv = torch.from_numpy(v1)
    np.testing.assert_allclose(P.thick_slices(tv, 3, axis=1).numpy(), ph1.thick["PD"], atol=1e-6)
    assert torch.equal(P.thick_slices(tv, 3, axis=1, mode="pick"), torch.from_numpy(picked))
    with pytest.raises(ValueError):
        P.thick_slices(v1, 20, axis=0)


def test_upsample_slices_inverts_shape():
    vol = np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3)
    up = P.upsample_slices(vol, 3)
    assert up.shape == (15, 2, 3) and np.array_equal(up[3:6], np.repeat(vol[1:2], 3, axis=0))
    assert np.array_equal(P.thick_slices(up, 3), vol)
    padded = P.upsample_slices(vol, 2, axis=0, size=12)
    assert padded.shape == (12, 2, 3) and np.array_equal(padded[-1], vol[-1])
    t = P.upsample_slices(torch.from_numpy(vol), 2, axis=2, size=7)
    assert t.shape == (5, 2, 7) and torch.equal(t[..., -1], t[..., -2])
    assert torch.equal(t[..., :6], torch.from_numpy(np.repeat(vol, 2, axis=2)))


# -------------------------------------------------------------------------------------------- (c) cardiac
@pytest.fixture(scope="module")
def cine():
    return P.cardiac_cine(n_frames=6, n_slices=8, size=40, seed=2)


def test_cardiac_determinism_and_shapes():
    a = P.cardiac_cine(n_frames=5, n_slices=6, size=24, seed=7, lax_size=(40, 30))
    b = P.cardiac_cine(n_frames=5, n_slices=6, size=24, seed=7, lax_size=(40, 30))
    c = P.cardiac_cine(n_frames=5, n_slices=6, size=24, seed=8, lax_size=(40, 30))
    assert a.sax.shape == a.sax_labels.shape == (5, 6, 24, 24)
    assert a.sax.dtype == np.float32 and a.sax_labels.dtype == np.uint8
    assert a.sax.min() >= 0 and a.sax.max() <= 1 and set(np.unique(a.sax_labels)) == {0, 1, 2, 3}
    assert np.array_equal(a.sax, b.sax) and not np.array_equal(a.sax, c.sax)
    assert set(a.lax) == {"2ch", "3ch", "4ch"}
    for plane in a.lax.values():
        assert plane.image.shape == plane.labels.shape == (5, 40, 30)
        assert plane.affine.shape == (4, 4)
    assert np.array_equal(a.lax["4ch"].image, b.lax["4ch"].image)
    # default lax size is square and covers the stack
    d = P.cardiac_cine()
    assert d.lax["4ch"].image.shape[1] == d.lax["4ch"].image.shape[2] >= 32


def test_cardiac_affine_is_oblique_and_renders_scene(cine):
    rot = cine.sax_affine[:3, :3]
    assert np.sum(np.abs(rot) > 1e-3) > 3  # not axis-aligned
    cols = rot / np.linalg.norm(rot, axis=0)
    np.testing.assert_allclose(cols.T @ cols, np.eye(3), atol=1e-9)  # orthogonal axes
    np.testing.assert_allclose(np.linalg.norm(rot, axis=0), [cine.slice_spacing, 1.5, 1.5])
    rng = np.random.default_rng(0)
    T, S, H, W = cine.sax.shape
    for _ in range(20):
        t, s, h, w = (int(rng.integers(n)) for n in (T, S, H, W))
        p = (cine.sax_affine @ np.array([s, h, w, 1.0]))[:3]
        inten, lab = cine.sample_scene(p[None], t)
        assert lab[0] == cine.sax_labels[t, s, h, w]
        assert inten[0] == pytest.approx(float(cine.sax[t, s, h, w]), abs=1e-5)
    # LAX pixels too, and the scene object is callable
    plane = cine.lax["3ch"]
    for r, c in ((5, 7), (20, 20), (30, 12)):
        p = (plane.affine @ np.array([r, c, 0, 1.0]))[:3]
        _, lab = cine.scene(p[None], 1)
        assert lab[0] == plane.labels[1, r, c]


def test_cardiac_lax_sax_agree_on_intersection(cine):
    inv_sax = np.linalg.inv(cine.sax_affine)
    plane = cine.lax["4ch"]
    inv_lax = np.linalg.inv(plane.affine)
    e1, e3 = cine.scene.axes[:, 0], cine.scene.axes[:, 2]
    T, S, H, W = cine.sax.shape
    agree = total = 0
    for s in range(S):
        centre = (cine.sax_affine @ np.array([s, (H - 1) / 2, (W - 1) / 2, 1.0]))[:3]
        ts = np.linspace(-0.45, 0.45, 121) * H * cine.pixel_spacing
        pts = centre + ts[:, None] * e1  # on the 4ch plane (spanned by e1, e3) and in SAX slice s
        vs = np.rint(np.c_[pts, np.ones(len(pts))] @ inv_sax.T)[:, :3].astype(int)
        vl = np.rint(np.c_[pts, np.ones(len(pts))] @ inv_lax.T)[:, :3].astype(int)
        assert (vs[:, 0] == s).all() and (vl[:, 2] == 0).all()
        ok = (vs[:, 1:] >= 0).all(1) & (vs[:, 1:] < H).all(1) & (vl[:, :2] >= 0).all(1)
        ok &= (vl[:, 0] < plane.labels.shape[1]) & (vl[:, 1] < plane.labels.shape[2])
        for t in range(T):
            ls = cine.sax_labels[t, s, vs[ok, 1], vs[ok, 2]]
            ll = plane.labels[t, vl[ok, 0], vl[ok, 1]]
            fg = (ls > 0) | (ll > 0)
            agree += int((ls[fg] == ll[fg]).sum())
            total += int(fg.sum())
        assert abs(float(np.dot(e3, e1))) < 1e-12
    assert total > 200
    assert agree / total >= 0.9


def test_cardiac_beats_and_views(cine):
    ed, es = cine.ed_frame, cine.es_frame
    assert (ed, es) == (0, 3)
    lv_ed = (cine.sax_labels[ed] == 1).sum()
    lv_es = (cine.sax_labels[es] == 1).sum()
    assert lv_ed > 1.3 * lv_es
    assert (cine.lax["4ch"].labels[ed] == 1).sum() > (cine.lax["4ch"].labels[es] == 1).sum()
    assert not (cine.lax["2ch"].labels == 3).any()
    assert (cine.lax["2ch"].labels == 1).any() and (cine.lax["2ch"].labels == 2).any()
    assert (cine.lax["4ch"].labels == 3).any() and (cine.lax["4ch"].labels == 1).any()
    # blood pool brighter than myocardium (bSSFP-like)
    assert cine.sax[cine.sax_labels == 1].mean() > cine.sax[cine.sax_labels == 2].mean() + 0.3


# -------------------------------------------------------------------------------------- (d) labelled image
@pytest.mark.parametrize(
    "shape,n_labels", [((64, 64), 3), ((48, 40), 6), ((32, 32, 32), 3), ((20, 24, 16), 4), ((8, 8), 5)]
)
def test_labelled_anatomy_all_labels_present(shape, n_labels):
    a = P.labelled_anatomy(shape, n_labels=n_labels, seed=1)
    assert a.image.shape == a.labels.shape == shape
    assert a.image.dtype == np.float32 and a.labels.dtype == np.int64 and a.n_labels == n_labels
    assert a.image.min() >= 0 and a.image.max() <= 1
    assert set(np.unique(a.labels)) == set(range(n_labels + 1))
    b = P.labelled_anatomy(shape, n_labels=n_labels, seed=1)
    c = P.labelled_anatomy(shape, n_labels=n_labels, seed=2)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, c.image)


def test_labelled_anatomy_distinct_intensities():
    a = P.labelled_anatomy((64, 64), n_labels=4, seed=0)
    means = sorted(float(a.image[a.labels == k].mean()) for k in range(5))
    assert min(np.diff(means)) > 0.05
    with pytest.raises(ValueError):
        P.labelled_anatomy((4, 4, 4, 4))


# --------------------------------------------------------------------------------------- (e) class volumes
def test_classed_volumes_cycle_and_differ():
    cv = P.classed_volumes(n=8, shape=(24, 28, 32), n_classes=4, seed=0)
    assert cv.volumes.shape == (8, 24, 28, 32) and cv.volumes.dtype == np.float32
    assert cv.volumes.min() >= -1 and cv.volumes.max() <= 1
    assert cv.labels.dtype == np.int64 and cv.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert cv.class_names == list(P.CLASS_NAMES[:4])
    means = [cv.volumes[cv.labels == k].mean(0) for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.abs(means[i] - means[j]).mean() > 0.05
    # same-class samples resemble each other more than other classes
    same = np.abs(cv.volumes[0] - cv.volumes[4]).mean()
    assert all(same < np.abs(cv.volumes[0] - cv.volumes[k]).mean() for k in (1, 2, 3))


def test_classed_volumes_determinism():
    a = P.classed_volumes(n=4, seed=3)
    assert np.array_equal(a.volumes, P.classed_volumes(n=4, seed=3).volumes)
    assert not np.array_equal(a.volumes, P.classed_volumes(n=4, seed=4).volumes)
    assert a.labels.tolist() == [0, 1, 0, 1] and len(a.class_names) == 2
    assert np.array_equal(P.classed_volumes(n=6, seed=3).volumes[:4], a.volumes)
    with pytest.raises(ValueError):
        P.classed_volumes(n_classes=len(P.CLASS_NAMES) + 1)

"""Checklist F1/F2 and the evaluation helpers."""

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mgdcr.evaluate import compare_methods, ejection_fraction, seg_metrics, slice_metrics
from mgdcr.infer import linear_interp_z, nearest_interp_z


def test_f1_psnr_ssim_match_skimage():
    rng = np.random.default_rng(0)
    gt = rng.random((3, 24, 24))
    pred = np.clip(gt + rng.normal(0, 0.05, gt.shape), 0, 1)
    m = slice_metrics(pred, gt, [0, 2])
    ps = np.mean([peak_signal_noise_ratio(gt[i], pred[i], data_range=1.0) for i in (0, 2)])
    ss = np.mean([structural_similarity(gt[i], pred[i], data_range=1.0) for i in (0, 2)])
    assert abs(m["psnr"] - ps) < 1e-6
    assert abs(m["ssim"] - ss) < 1e-6
    assert abs(m["rmse"] - np.mean([np.sqrt(((gt[i] - pred[i]) ** 2).mean()) for i in (0, 2)])) < 1e-9


def test_f2_dice_hd95_vs_monai_and_ef_by_hand():
    from monai.metrics import compute_dice, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    gt = np.zeros((6, 20, 20), np.int64)
    gt[1:5, 4:12, 4:12] = 1
    gt[1:5, 12:15, 4:12] = 2
    gt[1:5, 4:12, 14:18] = 3
    pred = np.roll(gt, 1, axis=2)
    spacing = (8.0, 1.5, 1.25)
    m = seg_metrics(pred, gt, spacing)
    p = one_hot(torch.as_tensor(pred)[None, None], 4)
    g = one_hot(torch.as_tensor(gt)[None, None], 4)
    d = compute_dice(p, g, include_background=False)[0]
    h = compute_hausdorff_distance(p, g, include_background=False, percentile=95, spacing=list(spacing))[0]
    for k, name in ((1, "LV"), (2, "MYO"), (3, "RV")):
        assert abs(m[f"dice_{name}"] - float(d[k - 1])) < 1e-6
        assert abs(m[f"hd95_{name}"] - float(h[k - 1])) < 1e-6
    assert abs(m["hd95_LV"] - 1.25) < 1e-6  # a one-column shift along the 1.25 mm axis
    ed = np.zeros((4, 10, 10), bool)
    ed[:, :5, :4] = True  # 80 voxels
    es = np.zeros_like(ed)
    es[:, :3, :4] = True  # 48 voxels
    r = ejection_fraction(ed, es, voxel_volume_mm3=2.0 * 2.0 * 10.0)
    assert abs(r["EDV_ml"] - 3.2) < 1e-12 and abs(r["ESV_ml"] - 1.92) < 1e-12
    assert abs(r["EF_pct"] - 40.0) < 1e-9


def test_baselines_and_comparison():
    sax = np.stack([np.full((8, 8), v) for v in (0.0, 0.4, 1.0)])
    lin = linear_interp_z(sax, 4)
    assert lin.shape == (9, 8, 8)
    np.testing.assert_allclose(lin[:, 0, 0], [0, 0.1, 0.2, 0.3, 0.4, 0.55, 0.7, 0.85, 1.0])
    np.testing.assert_allclose(nearest_interp_z(sax, 4)[:, 0, 0], [0, 0, 0.4, 0.4, 0.4, 0.4, 1, 1, 1])
    res = compare_methods(lin, {"linear": lin, "nearest": nearest_interp_z(sax, 4)}, 4)
    assert res["linear"]["heldout_psnr"] == 100.0 and res["nearest"]["heldout_psnr"] < 30
    # 3D PSNR pools the squared error of the 6 held-out slices: nearest errs by 0.1,0.2,0.1 (x2 gaps: 0.15,0.3,0.15)
    err = np.array([0.1, 0.2, 0.1, 0.15, 0.3, 0.15])
    assert abs(res["nearest"]["heldout_psnr3d"] + 10 * np.log10(np.mean(err**2))) < 1e-9
    assert res["linear"]["heldout_psnr3d"] == 100.0


def test_psnr3d_is_not_dominated_by_easy_slices():
    """Two held-out slices: one exact (per-slice PSNR capped at 100 dB), one with error 0.1. The mean of
    per-slice PSNRs is 60 dB, the pooled (volume) PSNR is 20 + 10 log10(2) = 23.0 dB."""
    from mgdcr.evaluate import psnr3d, slice_metrics

    gt = np.zeros((2, 4, 4))
    pred = gt.copy()
    pred[1] += 0.1
    assert abs(slice_metrics(pred, gt, [0, 1])["psnr"] - 60.0) < 1e-6
    assert abs(psnr3d(pred, gt, [0, 1]) - (20 + 10 * np.log10(2))) < 1e-9


def test_lpips_hook_on_heldout_slices():
    from medsynth_core.metrics import LPIPS

    lp = LPIPS("alex", random_backbone=True)  # random backbone: plumbing only, never downloads
    rng = np.random.default_rng(0)
    gt = rng.random((5, 64, 64))
    same = slice_metrics(gt, gt, [1, 3], lpips=lp)
    other = slice_metrics(np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1), gt, [1, 3], lpips=lp)
    assert abs(same["lpips"]) < 1e-6 and other["lpips"] > same["lpips"]


def test_heldout_protocol_selection_and_plumbing():
    from mgdcr.config import InverseConfig
    from mgdcr.demo import phantom_case
    from mgdcr.evaluate import choose_heldout, heldout_slice_eval
    from mgdcr.infer import IdentityPrior

    for n in (3, 4, 5, 9):
        picks = {choose_heldout(n, s) for s in range(40)}
        assert picks and all(1 <= p <= n - 2 for p in picks)
        assert all(abs(p - n // 2) <= 2 for p in picks)
    assert choose_heldout(9, 3) == choose_heldout(9, 3)  # seeded
    c = phantom_case(n_slices=5, K=2, size=16, seed=0)
    r = heldout_slice_eval(
        IdentityPrior(),
        c["sax"],
        c["sax_affine"],
        c["planes"],
        InverseConfig(K=2, iterations=2, harmonise=False),
        seed=0,
    )
    m = r["heldout_index"]
    # identity prior: the seed at the held-out position is the slerp (α = 1/2) of the two neighbours
    from mgdcr.infer import slerp

    mid = slerp(torch.as_tensor(c["sax"][m - 1]), torch.as_tensor(c["sax"][m + 1]), 0.5).numpy()
    expect = slice_metrics(mid[None], c["sax"][m][None], [0])
    assert abs(r["diffae_seed"]["psnr"] - expect["psnr"]) < 1e-4
    lin = slice_metrics((0.5 * (c["sax"][m - 1] + c["sax"][m + 1]))[None], c["sax"][m][None], [0])
    assert abs(r["linear"]["psnr"] - lin["psnr"]) < 1e-9
    assert r["linear"]["psnr"] < 100 and 1 <= m <= 3

"""Evaluation (spec §4): PSNR/SSIM/RMSE on held-out and acquired dense slices, Dice/HD95 per LV/MYO/RV from a
pluggable segmenter (MONAI via core), EDV/ESV/EF, and the baseline comparison (linear / nearest in z, DiffAE
seeds, optimised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from medsynth_core import metrics as M

LABELS = {1: "LV", 2: "MYO", 3: "RV"}


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, np.float64))[:, None]


def slice_metrics(pred: np.ndarray, gt: np.ndarray, index: Sequence[int], lpips=None) -> dict[str, float]:
    """Mean over the given slices of PSNR, SSIM (skimage's uniform 7×7 window) and RMSE, data_range 1, and
    LPIPS when an ``medsynth_core.metrics.LPIPS`` module is given (spec §4: AlexNet; inputs in [0,1])."""
    idx = list(index)
    if not idx:
        return {}
    p, g = _t(np.asarray(pred)[idx]), _t(np.asarray(gt)[idx])
    win = min(7, p.shape[-1] - (1 - p.shape[-1] % 2), p.shape[-2] - (1 - p.shape[-2] % 2))
    out = {
        "psnr": float(torch.nanmean(M.psnr(p, g, data_range=1.0).clamp(max=100.0))),
        "ssim": float(M.ssim(p, g, data_range=1.0, window="uniform", win_size=win).mean()),
        "rmse": float(M.rmse(p, g).mean()),
    }
    if lpips is not None:
        out["lpips"] = float(lpips(p.float(), g.float(), normalize=True).mean())
    return out


def psnr3d(pred: np.ndarray, gt: np.ndarray, index: Sequence[int]) -> float:
    """Volume-level PSNR (spec §4, DMCVR ``calculate_psnr_ssim``): one MSE pooled over the given slices,
    data_range 1, capped at 100 dB. Unlike the mean of per-slice PSNRs it is not dominated by near-empty
    slices that any interpolation reproduces almost exactly."""
    idx = list(index)
    p, g = _t(np.asarray(pred)[idx])[None], _t(np.asarray(gt)[idx])[None]  # the slices as one sample
    return float(M.psnr(p, g, data_range=1.0).clamp(max=100.0)[0])


def threshold_blood_pool(volume: np.ndarray, threshold: float = 0.6) -> np.ndarray:
    """Fixed-threshold blood-pool segmenter (spec §7-E4): bright blood vs myocardium/background."""
    return (np.asarray(volume) > threshold).astype(np.uint8)


def bloodpool_dice(
    pred: np.ndarray,
    gt: np.ndarray,
    index: Sequence[int],
    segmenter: Callable[[np.ndarray], np.ndarray] = threshold_blood_pool,
) -> float:
    """Blood-pool Dice (MONAI via core) of the segmenter's masks on the given dense slices (spec §7-E4)."""
    idx = list(index)
    seg, ref = segmenter(np.asarray(pred)[idx]), segmenter(np.asarray(gt)[idx])
    d = M.dice(
        torch.as_tensor(seg)[None, None].long(), torch.as_tensor(ref)[None, None].long(), num_classes=2
    )
    return float(d[0, 0])


def seg_metrics(
    pred_labels: np.ndarray, gt_labels: np.ndarray, spacing: Sequence[float], labels: dict[int, str] = LABELS
) -> dict[str, float]:
    """Dice and HD95 (mm, MONAI with spacing) per label of a (D,H,W) volume."""
    n = max(labels) + 1
    p = torch.as_tensor(np.asarray(pred_labels, np.int64))[None, None]
    g = torch.as_tensor(np.asarray(gt_labels, np.int64))[None, None]
    dice = M.dice(p, g, num_classes=n)[0]
    hd = M.hd95(p, g, spacing=list(spacing), num_classes=n)[0]
    out = {}
    for k, name in labels.items():
        out[f"dice_{name}"] = float(dice[k - 1])
        out[f"hd95_{name}"] = float(hd[k - 1])
    return out


def ejection_fraction(lv_ed: np.ndarray, lv_es: np.ndarray, voxel_volume_mm3: float) -> dict[str, float]:
    """EDV/ESV = LV blood-pool voxels × voxel volume / 1000 (mL); EF = 100·(EDV−ESV)/EDV (spec §4)."""
    edv = float(np.count_nonzero(lv_ed)) * voxel_volume_mm3 / 1000.0
    esv = float(np.count_nonzero(lv_es)) * voxel_volume_mm3 / 1000.0
    return {"EDV_ml": edv, "ESV_ml": esv, "EF_pct": 100.0 * (edv - esv) / edv if edv > 0 else float("nan")}


def compare_methods(
    gt: np.ndarray,
    methods: dict[str, np.ndarray],
    K: int,
    segmenter: Callable[[np.ndarray], np.ndarray] = threshold_blood_pool,
    spacing: Sequence[float] | None = None,
    lpips=None,
) -> dict[str, dict[str, float]]:
    """Held-out (dense slices not acquired) and acquired-slice metrics plus blood-pool Dice per method."""
    D = gt.shape[0]
    acquired = list(range(0, D, K))
    held = [i for i in range(D) if i % K]
    gt_seg = segmenter(gt)
    out = {}
    for name, vol in methods.items():
        if vol.shape != gt.shape:
            raise ValueError(f"method '{name}': shape {vol.shape} != ground truth {gt.shape}")
        r = {f"heldout_{k}": v for k, v in slice_metrics(vol, gt, held, lpips).items()}
        r["heldout_psnr3d"] = psnr3d(vol, gt, held)
        r.update({f"acquired_{k}": v for k, v in slice_metrics(vol, gt, acquired).items()})
        seg = segmenter(vol)
        r["heldout_bloodpool_dice"] = bloodpool_dice(vol, gt, held, segmenter)
        if spacing is not None:
            h = M.hd95(
                torch.as_tensor(seg)[None, None].long(),
                torch.as_tensor(gt_seg)[None, None].long(),
                spacing=list(spacing),
                num_classes=2,
            )
            r["bloodpool_hd95_mm"] = float(h[0, 0])
        out[name] = r
    return out


def choose_heldout(n: int, seed: int) -> int:
    """ex10 protocol: one seeded random slice among the middle 5, restricted to 1…n−2 so that both neighbours
    exist (fork: unseeded ``random.choice`` whose range can reach n−1, spec §5)."""
    if n < 3:
        raise ValueError(f"held-out protocol needs at least 3 slices, got {n}")
    mid = n // 2
    cands = [i for i in range(mid - 2, mid + 3) if 1 <= i <= n - 2]
    return int(np.random.default_rng(seed).choice(cands))


def heldout_slice_eval(
    prior,
    sax: np.ndarray,
    sax_affine: np.ndarray,
    planes,
    cfg,
    seed: int = 0,
    lpips=None,
    targets: tuple[np.ndarray, np.ndarray] | None = None,
    sax_raw: np.ndarray | None = None,
) -> dict:
    """ex10 / JH_evaluate protocol (spec §3.10, §4): drop slice m, reconstruct the gap between m−1 and m+1
    with 2K−1 filled slices (end slices frozen), and score the dense slice at m's position against the
    held-out slice: Linear (mean of neighbours), Nearest, DiffAE seed (pre-optimisation), DiffAE+LAX.

    As ex10 (L199-220), the LAX targets and the harmonisation reference are the rows K(m−1) … K(m+1) of the
    whole stack's dense grid: ``targets`` (fork LAX volume and mask on that grid, optional) and the reference
    of ``cfg.harmonise_reference`` over the whole stack (``sax_raw``: the slices before N4/normalisation)."""
    from dataclasses import replace

    from .infer import harmonise_reference, reconstruct

    sax = np.asarray(sax, np.float64)
    m = choose_heldout(sax.shape[0], seed)
    pair = sax[[m - 1, m + 1]]
    aff = np.asarray(sax_affine, np.float64).copy()
    aff[:3, 3] = aff[:3, 3] + (m - 1) * aff[:3, 0]
    aff[:3, 0] = 2 * aff[:3, 0]  # the two neighbours are two slice spacings apart
    icfg = replace(cfg, K=2 * cfg.K, freeze_ends=True)
    rows = slice(cfg.K * (m - 1), cfg.K * (m + 1) + 1)  # = round(linspace(K(m-1), K(m+1), 2K+1)) of ex10
    reference = harmonise_reference(sax, sax_raw, cfg)[rows]
    tg = None if targets is None else (np.asarray(targets[0])[rows], np.asarray(targets[1])[rows])
    res = reconstruct(prior, pair, aff, planes, icfg, targets=tg, reference=reference)
    k = cfg.K  # dense index of the held-out position
    gt = sax[m][None]
    methods = {
        "linear": 0.5 * (pair[0] + pair[1]),
        "nearest": pair[0],
        "diffae_seed": res.seeds[k],
        "diffae_lax": res.volume[k],
    }
    out = {"heldout_index": m}
    for name, img in methods.items():
        out[name] = slice_metrics(np.asarray(img)[None], gt, [0], lpips)
    return out

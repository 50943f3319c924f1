"""Paper metrics (spec §6): per-volume percentile normalisation, 3D PSNR/SSIM (scikit-image definitions),
MAE, slice-wise PSNR/SSIM (slices with target max <= 0 skipped); mean and std over subjects."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core import metrics as M
from medsynth_core.cli import UserError


def percentile_norm(x: np.ndarray, p_min: float = 0.5, p_max: float = 99.5) -> np.ndarray:
    """Clip to the volume's own 0.5th/99.5th percentiles (lower bound >= 0) and scale to [0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = np.percentile(x, [p_min, p_max])
    lo = max(lo, 0.0)
    if hi <= lo:
        return np.zeros_like(x)
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def psnr(target: np.ndarray, pred: np.ndarray, data_range: float = 1.0) -> float:
    t = torch.from_numpy(np.asarray(target, np.float64))[None, None]
    p = torch.from_numpy(np.asarray(pred, np.float64))[None, None]
    return float(M.psnr(p, t, data_range=data_range)[0])


def ssim(target: np.ndarray, pred: np.ndarray, data_range: float = 1.0) -> float:
    """skimage ``structural_similarity`` (7-wide uniform window, sample covariance) on 2D or 3D arrays."""
    t = torch.from_numpy(np.asarray(target, np.float64))[None, None]
    p = torch.from_numpy(np.asarray(pred, np.float64))[None, None]
    return float(M.ssim(p, t, data_range=data_range, window="uniform")[0])


def volume_metrics(target: np.ndarray, pred_unit: np.ndarray, paper_norm: bool = True) -> dict[str, float]:
    """``target`` in image units, ``pred_unit`` the generator output in [-1, 1]-space (``img + 1`` is
    normalised, spec §6). ``paper_norm=False`` gives the fixed-range variant of Q12 (pred (x+1)/2, target
    scaled by its 99.5th percentile)."""
    if target.shape != pred_unit.shape:
        raise UserError(f"prediction shape {pred_unit.shape} differs from the target {target.shape}")
    if paper_norm:
        t, p = percentile_norm(target), percentile_norm(pred_unit + 1.0)
    else:
        t = percentile_norm(target)
        p = np.clip((pred_unit + 1.0) / 2.0, 0, 1)
    out = {"psnr": psnr(t, p), "ssim": ssim(t, p), "mae": float(np.abs(t - p).mean())}
    ps, ss = [], []
    for i in range(t.shape[0]):
        if t[i].max() <= 0:
            continue
        ps.append(psnr(t[i], p[i]))
        ss.append(ssim(t[i], p[i]))
    out["psnr_slice"] = float(np.mean(ps)) if ps else float("nan")
    out["ssim_slice"] = float(np.mean(ss)) if ss else float("nan")
    return out


def summarize(per_case: dict[str, dict[str, float]]) -> dict[str, Any]:
    keys = sorted({k for v in per_case.values() for k in v})
    return {
        "mean": {k: float(np.mean([v[k] for v in per_case.values()])) for k in keys},
        "std": {k: float(np.std([v[k] for v in per_case.values()])) for k in keys},
        "n": len(per_case),
        "cases": per_case,
    }


def write_results(result: dict[str, Any], out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    cases = result["cases"]
    if cases:
        keys = sorted(next(iter(cases.values())))
        with open(out_dir / "metrics.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["case", *keys])
            for name, v in cases.items():
                w.writerow([name, *[v[k] for k in keys]])


def evaluate_folders(
    pred_dir: str | Path,
    target_dir: str | Path,
    out_dir: str | Path,
    pattern: str = "*.nii*",
    paper_norm: bool = True,
) -> dict[str, Any]:
    """Predictions written by ``synthesize`` ((x+1)*127.5 scale) vs targets of the same file name."""
    from .data import read_lps_array

    pred_dir, target_dir = Path(pred_dir), Path(target_dir)
    preds = sorted(pred_dir.glob(pattern))
    if not preds:
        raise UserError(f"{pred_dir}: no prediction files matching {pattern}")
    per_case = {}
    for p in preds:
        tpath = target_dir / p.name
        if not tpath.is_file():
            raise UserError(f"{tpath}: no target for prediction {p.name} (same file name expected)")
        pa, _ = read_lps_array(p)
        ta, _ = read_lps_array(tpath)
        per_case[p.name.split(".")[0]] = volume_metrics(ta, pa / 127.5 - 1.0, paper_norm)
    res = summarize(per_case)
    write_results(res, out_dir)
    return res


def evaluate_checkpoint(
    checkpoint: str | Path,
    source: str,
    target: str,
    thickness: int,
    out_dir: str | Path,
    overrides=(),
    seed: int = 0,
    paper_norm: bool = True,
) -> dict[str, Any]:
    """The official pipeline on the config's test split: every target slice predicted by G_ema from the
    source decimated by ``thickness`` (first slice aligned, as ``all_hr=False``), metrics per subject."""
    from medsynth_core.config import config_from_dict, config_to_dict, merge_dicts, parse_overrides

    from .config import Config
    from .data import build_volumes, load_h5_volumes
    from .infer import load_generator, synthesize_volume

    g, cfg = load_generator(checkpoint)
    if overrides:
        cfg = config_from_dict(Config, merge_dicts(config_to_dict(cfg), parse_overrides(list(overrides))))
    if source not in (*cfg.data.modalities, *cfg.data.sources):
        raise UserError(f"source '{source}' is not among the model's modalities {list(cfg.data.modalities)}")
    cfg.data.sources = tuple(dict.fromkeys([*cfg.data.sources, source]))
    names = None
    if cfg.data.kind == "h5":
        keys = list(dict.fromkeys([*cfg.data.modalities, source]))
        vols, names = load_h5_volumes(cfg.data.root, keys, cfg.data.test_list, return_names=True)
    else:
        vols = build_volumes(cfg.data, "test", seed=cfg.run.seed)
    per_case = {}
    for i, v in enumerate(vols):
        lr = v[source][::thickness] if thickness > 1 else v[source]
        pred = synthesize_volume(g, cfg, lr, target, thickness=thickness, seed=seed)
        tgt = v[target].astype(np.float64)
        n = min(tgt.shape[0], pred.shape[0])
        name = names[i] if names else f"case_{i:03d}"
        per_case[name] = volume_metrics(tgt[:n], pred[:n], paper_norm)
    res = summarize(per_case)
    res.update({"source": source, "target": target, "thickness": thickness, "checkpoint": str(checkpoint)})
    write_results(res, out_dir)
    return res

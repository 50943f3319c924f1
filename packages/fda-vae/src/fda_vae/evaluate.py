"""Evaluation (spec §5): per-slice PSNR / SSIM on [0,1] (data range 1, scikit-image uniform 7×7 SSIM as
test_xqm.py), MAE on [−1,1] (official) and [0,1], LPIPS-alex when local weights exist (else skipped with a
warning), deterministic (−μ) and sampled (−μ+σε) modes, both directions, optional per-volume aggregation.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from medsynth_core import metrics as M

from .model import FDAVAE
from .pairs import patient_of

DIRECTIONS = {"a2b": ("a", "b"), "b2a": ("b", "a")}


def to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def slice_metrics(
    pred: torch.Tensor, target: torch.Tensor, lpips: M.LPIPS | None = None
) -> dict[str, torch.Tensor]:
    """Per-slice metrics of (B,1,H,W) images in [−1,1] → dict of (B,) tensors."""
    p01, t01 = to01(pred), to01(target)
    out = {
        "psnr": M.psnr(p01, t01, data_range=1.0),
        "ssim": M.ssim(p01, t01, data_range=1.0, window="uniform"),
        "mae": M.mae(pred.float(), target.float()),  # [−1, 1] scale (official L1)
        "mae01": M.mae(p01, t01),
        "mse01": M.mse(p01, t01),
    }
    if lpips is not None:
        out["lpips"] = lpips(pred.float().clamp(-1, 1), target.float().clamp(-1, 1))
    return out


def mean_finite(values: Sequence[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


@torch.no_grad()
def evaluate_model(
    model: FDAVAE,
    dataset: Dataset,
    directions: Sequence[str] = ("a2b", "b2a"),
    modes: Sequence[str] = ("deterministic", "sampled"),
    batch_size: int = 8,
    seed: int = 0,
    lpips: M.LPIPS | None = None,
    per_volume: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Returns (summary, per-slice rows). Summary: ``{direction: {mode: {metric: mean}}}`` plus timing."""
    model.eval()
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for direction in directions:
        src, tgt = DIRECTIONS[direction]
        summary[direction] = {}
        for mode in modes:
            gen = torch.Generator(device=device).manual_seed(seed) if mode == "sampled" else None
            per: dict[str, list[float]] = defaultdict(list)
            vol_sq: dict[str, list[float]] = defaultdict(list)
            vol_ssim: dict[str, list[float]] = defaultdict(list)
            elapsed = 0.0
            for i in range(0, len(dataset), batch_size):
                items = [dataset[j] for j in range(i, min(i + batch_size, len(dataset)))]
                x = torch.stack([it[src] for it in items]).to(device)
                y = torch.stack([it[tgt] for it in items]).to(device)
                t0 = time.perf_counter()
                pred = model.translate(x, src, sample=mode == "sampled", generator=gen)
                if pred.is_cuda:
                    torch.cuda.synchronize(pred.device)
                elapsed += time.perf_counter() - t0
                m = slice_metrics(pred, y, lpips)
                for b, it in enumerate(items):
                    row = {"key": it["key"], "direction": direction, "mode": mode}
                    row.update({k: float(v[b]) for k, v in m.items()})
                    rows.append(row)
                    for k, v in m.items():
                        if k != "mse01":
                            per[k].append(float(v[b]))
                    vol_sq[patient_of(it["key"])].append(float(m["mse01"][b]))
                    vol_ssim[patient_of(it["key"])].append(float(m["ssim"][b]))
            res = {k: mean_finite(v) for k, v in per.items()}
            res["n_slices"] = len(per["psnr"])
            res["seconds_per_slice"] = elapsed / max(1, len(per["psnr"]))
            if per_volume:
                # per volume: PSNR of the slice stack (MSE pooled over the volume), mean SSIM of its slices
                vp = [10 * math.log10(1.0 / max(sum(v) / len(v), 1e-20)) for v in vol_sq.values()]
                res["volume"] = {
                    "psnr": mean_finite(vp),
                    "ssim": mean_finite([sum(v) / len(v) for v in vol_ssim.values()]),
                    "n_volumes": len(vp),
                }
            summary[direction][mode] = res
    return summary, rows


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def build_lpips(weights: str, device: str | torch.device = "cpu") -> M.LPIPS | None:
    """LPIPS-alex from a local AlexNet weight file; None (with a warning) when unavailable."""
    return M.lpips_or_none("alex", backbone_weights=weights or None, device=device)

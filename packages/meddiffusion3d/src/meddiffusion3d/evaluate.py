"""Evaluation (spec §5): AE reconstruction PSNR/SSIM/MAE, and the generation metrics FID / MMD over
Med3D 3D-ResNet-50 features (HA-GAN protocol) and pairwise MS-SSIM diversity.

Volumes are in [-1, 1] (``data_range`` 2). The Med3D backbone is MONAI's ``resnet50`` (shortcut B,
global average pooling → 2048-d); its weights (``resnet_50_23dataset.pth``) are a local file, a random
backbone (clearly flagged in the output) otherwise.
"""

from __future__ import annotations

import itertools
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from medsynth_core import metrics as M
from medsynth_core.atomic import atomic_write_text

from .autoencoder import PatchVolumeAE
from .encode import decode_latent, patch_encode


@torch.no_grad()
def reconstruct(
    ae: PatchVolumeAE,
    x: torch.Tensor,
    patch: int,
    chunk: int | None = None,
    tile: int = 0,
    overlap: float = 0.0,
) -> torch.Tensor:
    """Patch-wise encode → nearest codes → (tiled) whole-grid decode, the stage-2 inference path."""
    z = patch_encode(ae, x, patch, quantize=False, chunk=chunk)
    return decode_latent(ae, z, quantize=True, tile=tile, overlap=overlap)


def _ssim_win(shape: Sequence[int]) -> int:
    w = min(11, min(shape))
    return w if w % 2 else w - 1


def recon_metrics(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> dict[str, list[float]]:
    """Per-sample PSNR (dB), SSIM (Gaussian window, 3D) and MAE of (B, C, D, H, W) volumes in [-1, 1]."""
    x, y = x.float(), y.float().clamp(-1, 1)
    return {
        "psnr": M.psnr(y, x, data_range).tolist(),
        "ssim": M.ssim(y, x, data_range, win_size=_ssim_win(x.shape[2:])).tolist(),
        "mae": M.mae(y, x).tolist(),
    }


def med3d_resnet50(weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """MONAI 3D ResNet-50 (shortcut B, 1 input channel, no FC head) as the Med3D feature extractor."""
    from monai.networks.nets import resnet50

    net = resnet50(spatial_dims=3, n_input_channels=1, shortcut_type="B", feed_forward=False)
    if weights is None:
        warnings.warn(
            "no Med3D weights given: FID/MMD use a RANDOM 3D ResNet-50 (not comparable to the paper)",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        state = torch.load(os.fspath(weights), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, _ = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{weights}: not a Med3D ResNet-50 state dict (missing {missing[:5]})")
    return net.eval()


def fid(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    return float(M.frechet_distance(feats_a, feats_b))


def mmd(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Gaussian-kernel MMD² with the median-distance bandwidth (``torch_two_sample`` ``alphas='median'``)."""
    return float(M.mmd(feats_a, feats_b, kernel="rbf", unbiased=False))


def pairwise_ms_ssim(volumes: torch.Tensor, max_pairs: int | None = None, data_range: float = 2.0) -> float:
    """Mean MS-SSIM over distinct pairs of (N, 1, D, H, W) volumes (lower = more diverse). Volumes smaller
    than MS-SSIM's 5-scale minimum use a 3-tap window and as many scales as fit."""
    pairs = list(itertools.combinations(range(volumes.shape[0]), 2))[: max_pairs or None]
    if not pairs:
        raise ValueError("pairwise MS-SSIM needs at least 2 volumes")
    side = min(volumes.shape[2:])
    win, levels = 11, 5
    while M.ms_ssim_min_size(win, levels) > side and win > 3:
        win -= 2
    weights = None
    while M.ms_ssim_min_size(win, levels) > side and levels > 1:
        levels -= 1
    if levels < 5:
        w = torch.tensor([0.0448, 0.2856, 0.3001, 0.2363, 0.1333][:levels])
        weights = (w / w.sum()).tolist()
    if M.ms_ssim_min_size(win, levels) > side:
        raise ValueError(f"volumes of side {side} are too small for MS-SSIM")
    vals = [
        float(
            M.ms_ssim(
                volumes[i : i + 1].float(),
                volumes[j : j + 1].float(),
                data_range,
                weights=weights,
                win_size=win,
            )
        )
        for i, j in pairs
    ]
    return sum(vals) / len(vals)


def write_report(out: str | os.PathLike, summary: dict, per_case: list[dict] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2))
    if per_case:
        keys = list(per_case[0])
        lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in per_case]
        atomic_write_text(out / "per_case.csv", "\n".join(lines) + "\n")
    return out / "metrics.json"


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows]
    return float(sum(vals) / len(vals))


def evaluate_reconstruction(
    ae: PatchVolumeAE,
    volumes: Sequence[torch.Tensor],
    names: Sequence[str],
    patch: int,
    chunk: int | None = None,
    tile: int = 0,
    overlap: float = 0.0,
    keep: int = 0,
) -> tuple[dict, list]:
    """Per-case metrics; ``summary["recons"]`` holds the first ``keep`` reconstructions (for figures)."""
    rows, recons = [], []
    for name, v in zip(names, volumes):
        x = v.reshape(1, 1, *v.shape[-3:]).float()
        y = reconstruct(ae, x, patch, chunk, tile, overlap)
        if len(recons) < keep:
            recons.append(y[0, 0].cpu())
        m = recon_metrics(x, y)
        rows.append({"case": name, **{k: vals[0] for k, vals in m.items()}})
    summary = {
        "n": len(rows),
        **{f"{k}_mean": _mean(rows, k) for k in ("psnr", "ssim", "mae")},
        "data_range": 2.0,
        "ssim_window": "gaussian",
    }
    if keep:
        summary["recons"] = recons
    return summary, rows

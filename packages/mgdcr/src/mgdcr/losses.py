"""Losses. Training (spec §1.2) is the ε-MSE of ``GaussianDiffusion.loss``; the inverse-problem terms of
spec §3.6 live here: L = Σ_i [λ_lax·L_lax^i + λ_lat·L_lat^i + λ_s·L_s^i]."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lax_volume_loss(
    x: torch.Tensor, g: torch.Tensor, m: torch.Tensor, mask_target: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Per-slice L_lax^i = Σ_p (M·X̂ − G)² / Σ_p M, shape ``(D,)`` (spec §3.6).

    ``mask_target=False`` reproduces the fork (G not masked, only a constant for G outside M);
    ``eps=0`` reproduces its NaN on empty masks; the default ε-guard gives 0 there.
    """
    gt = g * m if mask_target else g
    num = ((m * x - gt) ** 2).flatten(1).sum(1)
    return num / (m.flatten(1).sum(1) + eps)


def latent_loss(xt: torch.Tensor, z: torch.Tensor, xt0: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """Per-slice L_lat^i = mean((x_T − x_T0)²) + mean((z − z_0)²), shape ``(D,)``."""
    return ((xt - xt0) ** 2).flatten(1).mean(1) + ((z - z0) ** 2).flatten(1).mean(1)


def smoothness_loss(x: torch.Tensor) -> torch.Tensor:
    """Per-slice L_s^i = mean((X̂^i − X̂^{i−1})²) + mean((X̂^i − X̂^{i+1})²), replicate padding, ``(D,)``."""
    flat = x.flatten(1)
    padded = F.pad(flat.t()[None], (1, 1), mode="replicate")[0].t()
    prev = ((flat - padded[:-2]) ** 2).mean(1)
    nxt = ((flat - padded[2:]) ** 2).mean(1)
    return prev + nxt

"""Uni-COAL losses (spec §4): non-saturating GAN, R1 (gamma=10, every step), L1 x80, SAM x100, blur warm-up."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core.training import ema_decay_from_half_life

from . import ops


def blur_sigma(n_img: float, init_sigma: float, fade_images: float) -> float:
    """sigma = init * max(0, 1 - n_img / fade) (spec §4; 0 when fading is off)."""
    if fade_images <= 0:
        return 0.0
    return max(1.0 - n_img / fade_images, 0.0) * init_sigma


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable kernel f(x) ~ 2^(-(x/sigma)^2), radius floor(3 sigma), same-size filtering."""
    radius = int(np.floor(sigma * 3))
    if radius <= 0:
        return img
    f = (
        torch.arange(-radius, radius + 1, device=img.device, dtype=torch.float32)
        .div(sigma)
        .square()
        .neg()
        .exp2()
    )
    return ops.filter2d(img, f / f.sum())


def d_loss(
    D: Callable,
    real_ab: torch.Tensor,
    fake_ab: torch.Tensor,
    c: torch.Tensor,
    index: torch.Tensor,
    sigma: float,
    r1_gamma: float,
) -> dict[str, torch.Tensor]:
    """L_D = softplus(D(fake)) + softplus(-D(real)) + gamma * 0.5 * E||grad_real D||^2 (all 5 channels)."""
    fake_logits = D(blur(fake_ab.detach(), sigma), c, index)
    loss_fake = F.softplus(fake_logits).mean()
    real = real_ab.detach().requires_grad_(r1_gamma > 0)
    real_logits = D(blur(real, sigma), c, index)
    loss_real = F.softplus(-real_logits).mean()
    out = {"D_fake": loss_fake, "D_real": loss_real}
    total = loss_fake + loss_real
    if r1_gamma > 0:
        (grads,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True, only_inputs=True)
        r1 = grads.square().sum([1, 2, 3]).mean() * 0.5
        out["D_r1"] = r1
        total = total + r1 * r1_gamma
    out["D"] = total
    return out


def g_loss(
    D: Callable,
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    fake_b: torch.Tensor,
    c: torch.Tensor,
    index: torch.Tensor,
    sigma: float,
    lambda_l1: float,
    lambda_sam: float,
    sam: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """L_G = softplus(-D(fake)) + lambda_L1 |fake-real|_1 + lambda_sam L_SAM, blur applied to all (spec §4)."""
    logits = D(blur(torch.cat([real_a, fake_b], 1), sigma), c, index)
    gan = F.softplus(-logits).mean()
    fb, rb = blur(fake_b, sigma), blur(real_b, sigma)
    l1 = (fb - rb).abs().mean() * lambda_l1
    out = {"G_gan": gan, "G_l1": l1}
    total = gan + l1
    if sam is not None and lambda_sam > 0:
        s = sam(fb, rb) * lambda_sam
        out["G_sam"] = s
        total = total + s
    out["G"] = total
    return out


# EMA beta = 0.5 ** (batch / half_life) (spec §4: 0.5^(16/10000) for the paper)
ema_beta = ema_decay_from_half_life


def lr_factor(epoch: int, policy: str, n_epochs: int, n_epochs_decay: int) -> float:
    """Q1: 'constant' (what the official run does) or pix2pix 'linear' (what it intended); epoch from 0."""
    if policy == "constant":
        return 1.0
    return 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)


def nan_to_num_grads(params) -> None:
    """NaN/Inf gradients -> 0 / +-1e5 before each step (as the official code)."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


__all__ = ["blur", "blur_sigma", "d_loss", "ema_beta", "g_loss", "lr_factor", "nan_to_num_grads"]

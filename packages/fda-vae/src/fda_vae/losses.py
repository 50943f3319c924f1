"""FDA-VAE losses (spec §3): L1 translation/reconstruction, KL, flip alignment, perceptual, PatchGAN."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medsynth_core.cli import UserError

from .config import LossConfig


def kl_divergence(
    mu: torch.Tensor,
    logvar: torch.Tensor | None = None,
    sigma: torch.Tensor | None = None,
    from_logvar: bool = True,
) -> torch.Tensor:
    """KL(N(μ,σ²) ‖ N(0,I)) = ½Σ(μ²+σ²−log σ²−1) summed over C,H,W, averaged over the batch (loss_fn.py:16-18).

    ``from_logvar=True`` (spec §6.12 fix) uses the clamped log-variance directly; ``False`` reproduces the
    official ``log(σ²)`` computed from σ (numerically the same up to rounding).
    """
    if logvar is None and sigma is None:
        raise ValueError("kl_divergence needs logvar or sigma")
    if sigma is None:
        sigma = torch.exp(0.5 * logvar)
    var = sigma.pow(2)
    log_var = logvar if (from_logvar and logvar is not None) else torch.log(var)
    kl = 0.5 * (mu.pow(2) + var - log_var - 1.0)
    return kl.flatten(1).sum(1).mean()


def fda_alignment(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> torch.Tensor:
    """L_FDA = ½·mean|μ_B + μ_A| + mean|σ_B² − σ_A²| (train_v3.py:236-238)."""
    return 0.5 * (mu_b + mu_a).abs().mean() + (sigma_b.pow(2) - sigma_a.pow(2)).abs().mean()


def patch_bce(logits: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """MONAI ``PatchAdversarialLoss(criterion="bce")``: sigmoid + BCE averaged over the patch logits."""
    target = torch.ones_like(logits) if target_is_real else torch.zeros_like(logits)
    return F.binary_cross_entropy(torch.sigmoid(logits), target)


def logits_of(disc_out) -> torch.Tensor:
    """The patch logits: the last activation returned by MONAI's PatchDiscriminator."""
    return disc_out[-1] if isinstance(disc_out, list | tuple) else disc_out


def discriminator_loss(disc: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """½[BCE(D(fake), 0) + BCE(D(real), 1)], fakes detached. Real and fake go through D in one batch
    (instance norm is per sample, so this equals two calls) so DDP sees one forward per backward."""
    n = real.shape[0]
    logits = logits_of(disc(torch.cat([real, fake.detach()], 0)))
    return 0.5 * (patch_bce(logits[n:], False) + patch_bce(logits[:n], True))


class PerceptualLoss(nn.Module):
    """MONAI ``PerceptualLoss(spatial_dims=2, network_type="resnet50")`` (spec §3, §6.4).

    ``resnet50-random`` (official): a frozen, randomly initialised ResNet-50 (``pretrained=False``, which
    MONAI builds with ``weights=None``: nothing is downloaded), seeded with ``seed`` without touching the
    global RNG stream. ``resnet50-pretrained``: the same network filled from a local torchvision weight file.
    ``none``: always 0. Inputs are fed as they come ([−1,1], as in the official code).
    """

    def __init__(self, kind: str = "resnet50-random", weights: str = "", seed: int = 0):
        super().__init__()
        self.kind = kind
        self.net = None
        if kind == "none":
            return
        from monai.losses import PerceptualLoss as MonaiPerceptual

        if kind == "resnet50-pretrained":
            if not weights or not os.path.isfile(weights):
                raise UserError(
                    f"loss.perceptual_weights={weights!r}: file not found; give a local torchvision "
                    "ResNet-50 state dict (resnet50-*.pth) or use loss.perceptual=resnet50-random"
                )
            self.net = MonaiPerceptual(
                spatial_dims=2, network_type="resnet50", pretrained=True, pretrained_path=weights
            )
        elif kind == "resnet50-random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.net = MonaiPerceptual(spatial_dims=2, network_type="resnet50", pretrained=False)
        else:
            raise ValueError(f"unknown perceptual network {kind!r}")
        self.net.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> PerceptualLoss:  # frozen: always eval
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            return x.new_zeros(())
        return self.net(x.float(), y.float())


@dataclass
class GeneratorLosses:
    total: torch.Tensor
    terms: dict[str, torch.Tensor]


def reconstruction_loss(out_a, out_b, x_a: torch.Tensor, x_b: torch.Tensor) -> torch.Tensor:
    """L_rec = ½[L1(B→B, B) + L1(A→A, A)]."""
    return 0.5 * (F.l1_loss(out_b.own, x_b) + F.l1_loss(out_a.own, x_a))


def generator_loss(
    cfg: LossConfig,
    out_a,
    out_b,
    x_a: torch.Tensor,
    x_b: torch.Tensor,
    disc_a: nn.Module | None,
    disc_b: nn.Module | None,
    perceptual: PerceptualLoss | None,
) -> GeneratorLosses:
    """Weighted generator objective of spec §3. ``out_a`` = G(A, 'a'), ``out_b`` = G(B, 'b').

    Perceptual and adversarial terms use only the cross outputs (A→B = ``out_a.cross``, B→A = ``out_b.cross``).
    """
    a2b, b2a = out_a.cross, out_b.cross
    rec = reconstruction_loss(out_a, out_b, x_a, x_b)
    trans = 0.5 * (F.l1_loss(a2b, x_b) + F.l1_loss(b2a, x_a))
    kl = 0.5 * (
        kl_divergence(out_a.mu, out_a.logvar, out_a.sigma, cfg.kl_from_logvar)
        + kl_divergence(out_b.mu, out_b.logvar, out_b.sigma, cfg.kl_from_logvar)
    )
    fda = fda_alignment(out_a.mu, out_a.sigma, out_b.mu, out_b.sigma)
    zero = x_a.new_zeros(())
    perc = zero
    if perceptual is not None and cfg.w_perc > 0:
        perc = 0.5 * (perceptual(b2a, x_a) + perceptual(a2b, x_b))
    adv = zero
    if disc_a is not None and disc_b is not None and cfg.w_adv > 0:
        adv = 0.5 * (patch_bce(logits_of(disc_b(a2b)), True) + patch_bce(logits_of(disc_a(b2a)), True))
    total = (
        cfg.w_rec * rec
        + cfg.w_trans * trans
        + cfg.w_kl * kl
        + cfg.w_fda * fda
        + cfg.w_perc * perc
        + cfg.w_adv * adv
    )
    return GeneratorLosses(
        total, {"rec": rec, "trans": trans, "kl": kl, "fda": fda, "perc": perc, "adv": adv}
    )

"""Autoencoder losses (spec §1.3): 4·L1 + commitment + 2·tri-plane LPIPS + hinge GAN + feature matching.

The perceptual backbone is LPIPS-VGG16 built through ``medsynth_core.metrics.LPIPS`` (local torchvision
weights, never downloaded; a random backbone with a warning when no file is given). Core's metric runs
under ``no_grad``, so the loss calls its inner ``lpips`` network directly to keep gradients.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import AEConfig


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -torch.mean(logits_fake)


def feature_matching_loss(feats_fake: list[torch.Tensor], feats_real: list[torch.Tensor]) -> torch.Tensor:
    """Σ_k L1(F_k(x̂), sg F_k(x)) over every discriminator block output but the logits."""
    return sum(F.l1_loss(a, b.detach()) for a, b in zip(feats_fake[:-1], feats_real[:-1]))


class TinyRandomPerceptual(nn.Module):
    """A fixed, randomly initialised (seed 0) 2-layer 2D conv net with LPIPS-style unit-normalised feature
    distances; a fast stand-in for LPIPS-VGG in CPU demos and tests (``perceptual: random_tiny_2d``)."""

    def __init__(self, width: int = 8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.requires_grad_(False)

    @staticmethod
    def _unit(f: torch.Tensor) -> torch.Tensor:
        return f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx1, fy1 = F.relu(self.conv1(x[:, :1])), F.relu(self.conv1(y[:, :1]))
        fx2, fy2 = F.relu(self.conv2(fx1)), F.relu(self.conv2(fy1))
        d = sum(
            (self._unit(a) - self._unit(b)).pow(2).sum(1).mean((1, 2)) for a, b in ((fx1, fy1), (fx2, fy2))
        )
        return d.view(-1, 1, 1, 1)


def build_perceptual(ae: AEConfig) -> nn.Module | None:
    if ae.perceptual == "none" or ae.tp_w == 0:
        return None
    if ae.perceptual == "random_tiny_2d":
        return TinyRandomPerceptual()
    from medsynth_core.metrics import LPIPS

    if ae.perceptual_weights is None:
        warnings.warn(
            "ae.perceptual_weights is not set: the tri-plane LPIPS-VGG loss uses a RANDOM VGG16 "
            "backbone (not perceptual). Point it to torchvision's vgg16-397923af.pth.",
            RuntimeWarning,
            stacklevel=2,
        )
    core = LPIPS(
        net="vgg", backbone_weights=ae.perceptual_weights, random_backbone=ae.perceptual_weights is None
    )
    net = core.model  # lpips.LPIPS: ScalingLayer broadcasts 1-channel input to 3 channels
    net.requires_grad_(False)
    return net


class TriPlanePerceptual(nn.Module):
    """L_TP: for each orthogonal orientation keep a random ⌊ratio·n⌋ of all B·n slices (same indices for x
    and x̂), average the perceptual distance over them, and sum over the three planes (spec §1.3)."""

    def __init__(self, net: nn.Module, ratio: float = 0.2, pin_eval: bool = True):
        super().__init__()
        self.net = net
        self.ratio = ratio
        self.pin_eval = pin_eval  # spec §6.2: official Lightning train() re-enables LPIPS dropout
        self.generator: torch.Generator | None = None  # run.deterministic: set per step by the training loop
        self.train(False)

    def train(self, mode: bool = True) -> TriPlanePerceptual:
        super().train(mode)
        if self.pin_eval:
            self.net.eval()
        return self

    @staticmethod
    def plane_slices(v: torch.Tensor, axis: int) -> torch.Tensor:
        """(B, C, D, H, W) → (B·n, C, a, b) slices orthogonal to spatial ``axis`` (0: D, 1: H, 2: W)."""
        b, c = v.shape[:2]
        s = v.movedim(2 + axis, 1)  # (B, n, C, a, b)
        return s.reshape(b * s.shape[1], c, *s.shape[3:])

    def n_slices(self, total: int) -> int:
        return max(1, int(total * self.ratio))  # at least one slice for tiny inputs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.generator is not None:
            return self._keyed(x, y, self.generator)
        loss = x.new_zeros(())
        for axis in range(3):
            xs, ys = self.plane_slices(x, axis), self.plane_slices(y, axis)
            idx = torch.randperm(xs.shape[0])[: self.n_slices(xs.shape[0])].to(x.device)
            loss = loss + torch.mean(self.net(xs.index_select(0, idx), ys.index_select(0, idx)))
        return loss

    def _keyed(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``run.deterministic`` (issue 18): the slices are drawn from the global batch's B·w·n slices (sample
        j of rank r is global sample j·w + r) with the step's generator; each rank scores the drawn slices it
        holds and divides their sum by the global count times 1/w, so DDP's gradient average is the mean over
        all drawn slices, as one process at the global batch computes it."""
        from medsynth_core.distributed import get_rank, get_world_size

        w, r, b = get_world_size(), get_rank(), x.shape[0]
        loss = x.new_zeros(())
        for axis in range(3):
            xs, ys = self.plane_slices(x, axis), self.plane_slices(y, axis)
            n = xs.shape[0] // b
            total = b * w * n
            chosen = torch.randperm(total, generator=g)[: self.n_slices(total)]
            sample, sl = chosen // n, chosen % n
            mine = sample % w == r
            idx = ((sample[mine] // w) * n + sl[mine]).to(x.device)
            if idx.numel():
                d = self.net(xs.index_select(0, idx), ys.index_select(0, idx))
                loss = loss + d.sum() * (w / chosen.numel())
        return loss


class AELoss(nn.Module):
    """Generator and discriminator objectives of both stages."""

    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        net = build_perceptual(cfg)
        self.perceptual = (
            TriPlanePerceptual(net, cfg.tp_ratio, cfg.perceptual_eval) if net is not None else None
        )
        self.d_loss = hinge_d_loss if cfg.disc_loss == "hinge" else vanilla_d_loss

    def gan_active(self, step: int, disc_start: int) -> bool:
        """Official ``global_step > discriminator_iter_start`` (strict) for the generator terms."""
        return step > disc_start and self.cfg.gan_w > 0

    def generator(
        self,
        x: torch.Tensor,
        x_recon: torch.Tensor,
        vq: dict,
        disc: nn.Module,
        step: int,
        disc_start: int,
        stage: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        l1 = F.l1_loss(x_recon, x)
        tp = self.perceptual(x, x_recon) if self.perceptual is not None else x.new_zeros(())
        zero = x.new_zeros(())
        g_adv, fm = zero, zero
        if self.gan_active(step, disc_start):
            logits_fake, feats_fake = disc(x_recon)
            with torch.no_grad():
                _, feats_real = disc(x)
            g_adv = generator_adv_loss(logits_fake)
            fm = feature_matching_loss(feats_fake, feats_real)
        commit = vq["commitment_loss"] if stage == 1 else zero  # stage 2 drops the commitment term
        loss = c.l1_w * l1 + commit + c.tp_w * tp + c.gan_w * g_adv + c.fm_w * fm
        logs = {
            "loss_g": loss.detach(),
            "l1": l1.detach(),
            "perceptual": tp.detach(),
            "commitment": commit.detach(),
            "g_adv": g_adv.detach(),
            "feat_match": fm.detach(),
            "perplexity": vq["perplexity"].detach(),
        }
        return loss, logs

    def discriminator(
        self, logits_real: torch.Tensor, logits_fake: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        d = self.d_loss(logits_real, logits_fake)
        loss = self.cfg.gan_w * d
        return loss, {
            "loss_d": loss.detach(),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }

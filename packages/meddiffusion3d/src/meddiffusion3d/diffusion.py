"""Gaussian diffusion of 3D MedDiffusion (spec §3): cosine schedule, ε-prediction, L1 (official) or L2 (paper)
loss, ancestral DDPM sampling, a corrected DDIM (spec §6 item 8), optional classifier-free guidance (off by
default: the official model has none) and the model-EMA rule of spec §2 / checklist item 14.

The samplers step with MONAI's schedulers (``medsynth_core.schedulers``: ``AncestralScheduler`` for DDPM,
``SpacedDDIMScheduler`` for DDIM; issue 17) on the official schedule in float64, cast where used (so their
coefficients equal the official float32 buffers); the module keeps those buffers for checkpoints and training.

The denoiser is called as ``denoise_fn(x_t, t, y=y, res=res)`` and, for a ControlNet, with ``hint=hint`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsynth_core.schedulers import AncestralScheduler, SpacedDDIMScheduler, cosine_clipped, randn
from medsynth_core.training import EMA, progress

__all__ = ["GaussianDiffusion", "ModelEMA", "cosine_beta_schedule", "randn"]

Generator = torch.Generator | Sequence[torch.Generator] | None


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """β_t of the cosine schedule (Nichol & Dhariwal), in float64, clipped to [0, 0.9999] (spec §3)."""
    return cosine_clipped(timesteps, s, max_beta=0.9999)


def _extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] reshaped to broadcast over x (all dims but the batch), fixing the official DDIM 4-D reshape."""
    return a.to(x.device)[t].to(x.dtype).reshape(t.shape[0], *((1,) * (x.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Cosine-schedule Gaussian diffusion with the official buffer names (``betas``, ``alphas_cumprod``, ...).

    Args:
        timesteps: T (1000 in the paper). loss: ``"l1"`` (official, released weights) or ``"l2"`` (the paper's
            formula). clip_denoised: clamp x̂₀ to [-1, 1] while sampling (official). cond_drop_prob: probability of
            replacing the class by ``null_class`` during training (classifier-free guidance; 0 = off, official).
        null_class: the class index meaning "no class" (``BiFlowNet(null_class=True)`` reserves index ``classes``).
        ddim_recompute_eps: DDIM direction term from the network's ε (False, official ``p_sample_ddim``) or
            from ε recomputed to agree with the clipped x̂₀, ``(x_t − √ᾱ_t x̂₀)/√(1−ᾱ_t)`` (True).
    """

    def __init__(
        self,
        timesteps: int = 1000,
        loss: str = "l1",
        schedule: str = "cosine",
        clip_denoised: bool = True,
        cond_drop_prob: float = 0.0,
        null_class: int | None = None,
        ddim_recompute_eps: bool = False,
    ):
        super().__init__()
        if schedule != "cosine":
            raise ValueError(f"only the cosine schedule of the paper is implemented, got {schedule!r}")
        if loss not in ("l1", "l2"):
            raise ValueError(f"diffusion loss must be 'l1' (official) or 'l2' (paper), got {loss!r}")
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if cond_drop_prob > 0 and null_class is None:
            raise ValueError("cond_drop_prob > 0 (classifier-free guidance) needs null_class")
        self.num_timesteps = int(timesteps)
        self.loss_type = loss
        self.clip_denoised = clip_denoised
        self.cond_drop_prob = float(cond_drop_prob)
        self.null_class = null_class
        self.ddim_recompute_eps = bool(ddim_recompute_eps)

        betas = cosine_beta_schedule(timesteps)
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = F.pad(ac[:-1], (1, 0), value=1.0)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        bufs = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
        }
        for k, v in bufs.items():  # computed in float64, stored as float32 (as officially)
            self.register_buffer(k, v.to(torch.float32), persistent=True)
        # MONAI schedulers on the same schedule, kept in float64 and cast where used, so their coefficients equal
        # the float32 buffers above (plain attributes: not in the state dict)
        sched = dict(schedule="cosine_clipped", s=0.008, max_beta=0.9999)
        object.__setattr__(self, "ddpm", AncestralScheduler(timesteps, clip_sample=clip_denoised, **sched))
        object.__setattr__(self, "ddim", SpacedDDIMScheduler(
            timesteps, clip_sample=clip_denoised, recompute_eps=self.ddim_recompute_eps, **sched))  # fmt: skip

    # --------------------------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t) * x0
            + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return (
            mean,
            _extract(self.posterior_variance, t, x_t),
            _extract(self.posterior_log_variance_clipped, t, x_t),
        )

    # --------------------------------------------------------------------------------- training
    def training_loss(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: Generator = None,
    ) -> torch.Tensor:
        """ε-prediction loss with t ~ U{0..T−1}: mean |ε − ε̂| (``l1``) or mean (ε − ε̂)² (``l2``) (spec §3).

        ``generator`` may be a list with one generator per sample: each sample's t, ε and class-drop draw then
        come from its own generator (``run.deterministic``: a batch split over ranks draws as one process)."""
        if not torch.isfinite(x0).all():
            raise ValueError("diffusion training latent contains NaN/Inf")
        b = x0.shape[0]
        per_sample = isinstance(generator, (list, tuple))
        if per_sample and len(generator) != b:
            raise ValueError(f"{len(generator)} generators for a batch of {b}")

        def draw(fn, *args):  # (b,) draws: one per sample from its generator, or one call
            if per_sample:
                return torch.cat([fn(*args, (1,), generator=g, device=g.device) for g in generator]).to(x0.device)
            dev = x0.device if generator is None else generator.device
            return fn(*args, (b,), generator=generator, device=dev).to(x0.device)

        if t is None:
            t = draw(torch.randint, 0, self.num_timesteps)
        if noise is None:
            noise = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
        if self.cond_drop_prob > 0 and y is not None:
            drop = draw(torch.rand)
            y = torch.where(drop < self.cond_drop_prob, torch.full_like(y, self.null_class), y)
        x_t = self.q_sample(x0, t, noise)
        kw: dict[str, Any] = {"y": y, "res": res}
        if hint is not None:
            kw["hint"] = hint
        eps_hat = denoise_fn(x_t, t, **kw)
        if self.loss_type == "l1":
            return F.l1_loss(eps_hat, noise)
        return F.mse_loss(eps_hat, noise)

    # --------------------------------------------------------------------------------- model call (+ CFG)
    def model_eps(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        res: torch.Tensor | None,
        hint: torch.Tensor | None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """ε̂; with ``guidance_scale != 1`` classifier-free guidance ε_u + s·(ε_c − ε_u) using ``null_class``."""
        kw: dict[str, Any] = {"res": res}
        if hint is not None:
            kw["hint"] = hint
        eps = denoise_fn(x, t, y=y, **kw)
        if guidance_scale == 1.0:
            return eps
        if self.null_class is None or y is None:
            raise ValueError(
                "classifier-free guidance needs a class-conditional model trained with a null class "
                "(diffusion.null_class) and y"
            )
        eps_u = denoise_fn(x, t, y=torch.full_like(y, self.null_class), **kw)
        return eps_u + guidance_scale * (eps - eps_u)

    # --------------------------------------------------------------------------------- DDPM
    @torch.no_grad()
    def p_sample(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: Generator = None,
    ) -> torch.Tensor:
        """One ancestral step x_t → x_{t−1} (MONAI's DDPM step): posterior mean from the clipped x̂₀, variance β̃
        (floored at 1e-20); no noise at t = 0. The batch shares one timestep."""
        step = int(t.reshape(-1)[0])
        if not bool((t == step).all()):
            raise ValueError(f"p_sample steps a batch at one timestep, got {t.tolist()}")
        eps = self.model_eps(denoise_fn, x, t, y, res, hint, guidance_scale)
        return self.ddpm.step(eps, step, x, generator)[0]

    @torch.no_grad()
    def sample_ddpm(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        z: torch.Tensor,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling over all T steps starting from the noise ``z`` (the paper's sampler, spec §3)."""
        x = z
        steps = range(self.num_timesteps - 1, -1, -1)
        it = progress(steps, total=self.num_timesteps, desc="DDPM") if show_progress else steps
        for i in it:
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(denoise_fn, x, t, y, res, hint, guidance_scale, generator)
        return x

    # --------------------------------------------------------------------------------- DDIM
    def ddim_timesteps(self, steps: int) -> list[int]:
        """Descending timesteps: ``linspace(0, T−1, steps)`` truncated to integers, as officially."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.num_timesteps}], got {steps}")
        ts = torch.linspace(0, self.num_timesteps - 1, steps).long().unique().tolist()
        return sorted(ts, reverse=True)

    @torch.no_grad()
    def ddim_step(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        x: torch.Tensor,
        t: int,
        t_prev: int,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
        eta: float = 0.0,
        guidance_scale: float = 1.0,
        generator: Generator = None,
    ) -> torch.Tensor:
        """x_t → x_{t_prev} (Song et al. eq. 12). Fixes spec §6 item 8: ᾱ broadcast over 5-D batches, σ taken out
        of the direction term, ᾱ_prev = 1 after the last step (t_prev = −1). The direction uses the network's ε
        as officially, or, with ``ddim_recompute_eps``, the ε of the clipped x̂₀."""
        if not (0 <= t < self.num_timesteps and -1 <= t_prev < t):
            raise ValueError(f"DDIM step needs 0 <= t_prev < t < {self.num_timesteps} or t_prev = -1, got {t}, {t_prev}")
        # a pair outside the scheduler's current list (sample_ddim sets the whole list once)
        if self.ddim._prev.get(t) != t_prev:
            self.ddim.set_timesteps(timesteps=[t] if t_prev < 0 else [t_prev, t])
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = self.model_eps(denoise_fn, x, tt, y, res, hint, guidance_scale)
        return self.ddim.step(eps, t, x, eta=eta, generator=generator)[0]

    @torch.no_grad()
    def sample_ddim(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        z: torch.Tensor,
        steps: int = 100,
        eta: float = 0.0,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        ts = self.ddim_timesteps(steps)
        self.ddim.set_timesteps(timesteps=ts)
        x = z
        pairs = list(zip(ts, [*ts[1:], -1], strict=True))
        it = progress(pairs, total=len(pairs), desc="DDIM") if show_progress else pairs
        for t, t_prev in it:
            x = self.ddim_step(denoise_fn, x, t, t_prev, y, res, hint, eta, guidance_scale, generator)
        return x

    @torch.no_grad()
    def sample(
        self,
        denoise_fn: Callable[..., torch.Tensor],
        z: torch.Tensor,
        sampler: str = "ddpm",
        steps: int | None = None,
        eta: float = 0.0,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        generator: Generator = None,
        show_progress: bool = False,
    ) -> torch.Tensor:
        """Sample from noise ``z`` with ``"ddpm"`` (all T steps, paper) or ``"ddim"`` (``steps``, ``eta``)."""
        if sampler == "ddpm":
            return self.sample_ddpm(denoise_fn, z, y, res, hint, guidance_scale, generator, show_progress)
        if sampler == "ddim":
            return self.sample_ddim(
                denoise_fn, z, steps or 100, eta, y, res, hint, guidance_scale, generator, show_progress
            )
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")


class ModelEMA:
    """Model EMA of the official BiFlowNet training (spec §2 / checklist 14): every ``update_every`` (10) steps, a
    plain copy while ``step < start_step`` (2000), afterwards θ_ema ← 0.995·θ_ema + 0.005·θ.

    ``step`` is the number of optimiser steps completed (the official ``train_steps`` after its increment).
    """

    def __init__(
        self, model: nn.Module, decay: float = 0.995, update_every: int = 10, start_step: int = 2000
    ):
        self.ema = EMA(model, decay)
        self.decay, self.update_every, self.start_step = decay, int(update_every), int(start_step)

    @property
    def module(self) -> nn.Module:
        return self.ema.module

    def step(self, model: nn.Module, step: int) -> str | None:
        """Apply the rule after optimiser step ``step``; returns ``"copy"``, ``"ema"`` or ``None``."""
        if step % self.update_every:
            return None
        if step < self.start_step:
            self.ema.copy_from(model)
            return "copy"
        self.ema.update(model, decay=self.decay)
        return "ema"

    def state_dict(self) -> dict[str, Any]:
        return {**self.ema.state_dict(), "update_every": self.update_every, "start_step": self.start_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)
        self.update_every = int(state.get("update_every", self.update_every))
        self.start_step = int(state.get("start_step", self.start_step))

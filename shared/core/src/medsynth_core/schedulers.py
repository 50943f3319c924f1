"""DDPM and DDIM on MONAI's schedulers, with the conventions of the official diffusion codes (issue 17).

MONAI's ``DDPMScheduler`` / ``DDIMScheduler`` give the schedule registry, the timestep bookkeeping and the
posterior of the ancestral step. The official diffusion codes the packages follow (guided-diffusion lineage)
differ from them in ways that change the numbers, so the subclasses here pin those conventions down:

* the schedule is computed in float64 (``schedule_dtype`` may store it as float32, as some official
  buffers are) and ``add_noise`` never casts the stored schedule to the sample's dtype;
* x̂₀ is ``√(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε`` and ε from x̂₀ is ``(√(1/ᾱ_t)·x_t − x̂₀)/√(1/ᾱ_t − 1)``, the
  guided-diffusion forms both official codes use;
* DDIM runs over an explicit, possibly irregular list of timesteps (integer strides that need not divide T,
  a truncated ``linspace``): the previous / next timestep is the list's neighbour, not ``t ∓ T // N``;
  optionally the direction term uses the ε of the clipped x̂₀;
* DDIM inversion (``reversed_step``) ends at ᾱ = ``final_alpha_next`` (0: x_T is the last ε estimate);
* noise may come from one generator per batch element (:func:`randn`), so a batch samples as its elements one
  at a time.

Extra schedules registered in MONAI's ``NoiseSchedules``: ``linear_beta_rescaled`` (linear β whose ends are
scaled by 1000/T, guided-diffusion's ``get_named_beta_schedule``), ``constant_beta`` and ``cosine_clipped`` (Nichol & Dhariwal in float64, β clipped to ``max_beta``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules

__all__ = ["AncestralScheduler", "SpacedDDIMScheduler", "randn"]

Generator = torch.Generator | Sequence[torch.Generator] | None


# ------------------------------------------------------------------------------------------- schedules
def _register(name: str, desc: str):
    def deco(fn):
        NoiseSchedules.add(name, desc, fn)
        return fn

    return deco


@_register("linear_beta_rescaled", "linear beta with both ends scaled by 1000/T (guided-diffusion), float64")
def linear_beta_rescaled(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    scale = 1000.0 / num_train_timesteps
    return torch.from_numpy(
        np.linspace(scale * beta_start, scale * beta_end, num_train_timesteps, dtype=np.float64)
    )


@_register("constant_beta", "constant beta, float64")
def constant_beta(num_train_timesteps: int, beta: float = 0.008) -> torch.Tensor:
    return torch.full((num_train_timesteps,), float(beta), dtype=torch.float64)


@_register("cosine_clipped", "cosine schedule (Nichol & Dhariwal) in float64, beta clipped to max_beta")
def cosine_clipped(num_train_timesteps: int, s: float = 0.008, max_beta: float = 0.9999) -> torch.Tensor:
    x = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=torch.float64)
    ac = torch.cos((x / num_train_timesteps + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    return torch.clip(1 - ac[1:] / ac[:-1], 0, max_beta)


# ------------------------------------------------------------------------------------------- noise
def randn(
    shape: Sequence[int], generator: Generator = None, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise. ``generator`` may be a list with one generator per batch element, so that a batch
    gives the same draws as the same samples run one at a time."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        out = torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        )
    elif generator is not None:  # draw on the generator's device (a CPU generator also serves CUDA tensors)
        out = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    else:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return out.to(device) if device is not None else out


# ------------------------------------------------------------------------------------------- shared maths
class _OfficialConventions:
    """What both subclasses share; mixed in before the MONAI class."""

    alphas_cumprod: torch.Tensor
    clip_sample: bool
    clip_sample_values: list[float]

    def _store_schedule(self, dtype: torch.dtype) -> None:
        # betas, alphas, alphas_cumprod of MONAI's base class, kept in ``dtype``; float64 copies for scalars
        self.betas, self.alphas = self.betas.to(dtype), self.alphas.to(dtype)
        self.alphas_cumprod = self.alphas_cumprod.to(dtype)
        self._ac = self.alphas_cumprod.to(torch.float64)
        self.one = torch.tensor(1.0, dtype=dtype)

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t as a Python float (float64), from the stored schedule."""
        return float(self._ac[int(t)])

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """q(x_t | x_0): √ᾱ_t and √(1−ᾱ_t) taken in the schedule's dtype, then cast to the sample's (the
        official ``_extract_into_tensor``); the stored schedule is left as it is (MONAI's casts it)."""
        ac = self.alphas_cumprod.to(original_samples.device)[timesteps.to(original_samples.device).long()]
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        a = ac.sqrt().to(original_samples.dtype).reshape(shape)
        b = (1.0 - ac).sqrt().to(original_samples.dtype).reshape(shape)
        return a * original_samples + b * noise

    def predict_x0(
        self, eps: torch.Tensor, t: int, sample: torch.Tensor, clip: bool | None = None
    ) -> torch.Tensor:
        """x̂₀ = √(1/ᾱ_t)·x_t − √(1/ᾱ_t − 1)·ε, clamped to the clip range when ``clip`` (default: the
        scheduler's ``clip_sample``)."""
        a = self.alpha_bar(t)
        x0 = math.sqrt(1.0 / a) * sample - math.sqrt(1.0 / a - 1.0) * eps
        if self.clip_sample if clip is None else clip:
            x0 = x0.clamp(*self.clip_sample_values)
        return x0

    def predict_eps(self, x0: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """ε that agrees with ``x0``: (√(1/ᾱ_t)·x_t − x̂₀)/√(1/ᾱ_t − 1)."""
        a = self.alpha_bar(t)
        return (math.sqrt(1.0 / a) * sample - x0) / math.sqrt(1.0 / a - 1.0)


# ------------------------------------------------------------------------------------------- DDPM
class AncestralScheduler(_OfficialConventions, DDPMScheduler):
    """MONAI's ``DDPMScheduler`` (ε-prediction, ``fixed_small`` variance β̃_t floored at 1e-20) with the
    official x̂₀ form and per-sample generators. ``step`` returns ``(x_{t−1}, x̂₀)``; no noise at t = 0."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        schedule_dtype: torch.dtype = torch.float64,
        **schedule_args,
    ) -> None:
        super().__init__(
            num_train_timesteps,
            schedule,
            variance_type="fixed_small",
            clip_sample=clip_sample,
            **schedule_args,
        )
        self._store_schedule(schedule_dtype)

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: Generator = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(timestep)
        x0 = self.predict_x0(model_output, t, sample)
        mean = self._get_mean(t, x0, sample)  # MONAI's posterior mean (DDPM eq. 7)
        if t > 0:
            std = self._get_variance(t).sqrt().to(sample.dtype)
            mean = mean + std * randn(sample.shape, generator, device=sample.device, dtype=sample.dtype)
        return mean.to(sample.dtype), x0


# ------------------------------------------------------------------------------------------- DDIM
class SpacedDDIMScheduler(_OfficialConventions, DDIMScheduler):
    """MONAI's ``DDIMScheduler`` over an explicit list of timesteps (Song et al. eq. 12; ε-prediction).

    Args:
        recompute_eps: the direction term uses the ε of the clipped x̂₀ instead of the network's ε (MONAI's
            choice); only differs where clipping bites.
        final_alpha_next: ᾱ after the last timestep of ``reversed_step`` (0: x_T = the last ε estimate).
        schedule_dtype: dtype the schedule is stored in (computed in float64 by the ``*_beta`` functions here).

    After the first timestep of the list, ᾱ_prev = 1 (``set_alpha_to_one``): the last step returns x̂₀.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        recompute_eps: bool = False,
        final_alpha_next: float = 0.0,
        schedule_dtype: torch.dtype = torch.float64,
        **schedule_args,
    ) -> None:
        self._prev: dict[int, int] = {}
        self._next: dict[int, int] = {}
        super().__init__(
            num_train_timesteps, schedule, clip_sample=clip_sample, set_alpha_to_one=True, **schedule_args
        )
        self._store_schedule(schedule_dtype)
        self.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
        self.recompute_eps = bool(recompute_eps)
        self.final_alpha_next = float(final_alpha_next)

    def set_timesteps(  # type: ignore[override]
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | None = None,
    ) -> None:
        """``timesteps`` (distinct integers in [0, T), any order) or MONAI's even spacing of
        ``num_inference_steps``; ``self.timesteps`` is descending, as MONAI's."""
        if timesteps is None:
            if num_inference_steps is None:
                raise ValueError("give num_inference_steps or timesteps")
            super().set_timesteps(num_inference_steps, device)
            ts = sorted(set(int(t) for t in self.timesteps.tolist()))
        else:
            ts = sorted(set(int(t) for t in timesteps))
            if len(ts) != len(list(timesteps)):
                raise ValueError(f"DDIM timesteps must be distinct, got {list(timesteps)}")
        if not ts or ts[0] < 0 or ts[-1] >= self.num_train_timesteps:
            raise ValueError(f"DDIM timesteps must lie in [0, {self.num_train_timesteps}), got {ts[:3]}...")
        self.num_inference_steps = len(ts)
        self.timesteps = torch.tensor(ts[::-1], dtype=torch.long, device=device)
        self._prev = {t: (ts[i - 1] if i > 0 else -1) for i, t in enumerate(ts)}
        self._next = {t: (ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)}

    def _alpha_or(self, t: int, final: float) -> float:
        return self.alpha_bar(t) if t >= 0 else final

    def _direction_eps(
        self, eps: torch.Tensor, x0: torch.Tensor, t: int, sample: torch.Tensor
    ) -> torch.Tensor:
        return self.predict_eps(x0, t, sample) if (self.recompute_eps and self.clip_sample) else eps

    def step(  # type: ignore[override]
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        eta: float = 0.0,
        generator: Generator = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t → x_{t_prev} with σ_t(η) taken out of the direction term; returns ``(x_{t_prev}, x̂₀)``."""
        t = int(timestep)
        if t not in self._prev:
            raise ValueError(f"timestep {t} is not one of this scheduler's DDIM timesteps")
        a_t = self.alpha_bar(t)
        a_prev = self._alpha_or(self._prev[t], float(self.final_alpha_cumprod))
        x0 = self.predict_x0(model_output, t, sample)
        eps = self._direction_eps(model_output, x0, t, sample)
        sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(max(1.0 - a_t / a_prev, 0.0))
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            x_prev = x_prev + sigma * randn(sample.shape, generator, device=sample.device, dtype=sample.dtype)
        return x_prev, x0

    def reversed_step(  # type: ignore[override]
        self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM inversion x_t → x_{t_next} (the reverse ODE, η = 0); after the last timestep ᾱ =
        ``final_alpha_next``. Returns ``(x_{t_next}, x̂₀)``."""
        t = int(timestep)
        if t not in self._next:
            raise ValueError(f"timestep {t} is not one of this scheduler's DDIM timesteps")
        a_next = self._alpha_or(self._next[t], self.final_alpha_next)
        x0 = self.predict_x0(model_output, t, sample)
        eps = self._direction_eps(model_output, x0, t, sample)
        return math.sqrt(a_next) * x0 + math.sqrt(1.0 - a_next) * eps, x0

"""Gaussian diffusion with the exact DiffAE conventions (spec §1.2, checklist B), on MONAI's DDIM scheduler
(``medsynth_core.schedulers.SpacedDDIMScheduler``; issue 17):

* linear β from 1e-4 to 0.02 (both scaled by 1000/T), ᾱ in float64 (the ``linear_beta_rescaled`` schedule);
* ``ddimN`` spacing: the smallest integer stride s with ``len(range(0, T, s)) == N``;
* ε-prediction, raw integer t passed to the network (``rescale_timesteps=False``);
* DDIM (η = 0) decode and stochastic encoding (reverse ODE) with x̂₀ clipped to [-1, 1] at every step and ε
  recomputed from it, and ᾱ_next = 0 at the last encoding step so that x_T equals the final ε estimate.

Coefficients are float64 and cast to the tensor dtype when used (as the official ``_extract_into_tensor``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from medsynth_core.schedulers import SpacedDDIMScheduler

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_stride(n_steps: int, T: int = 1000) -> int:
    """Stride of the official ``space_timesteps(T, "ddimN")``; raises when no integer stride gives N."""
    if n_steps == T:
        return 1
    for s in range(1, T):
        if len(range(0, T, s)) == n_steps:
            return s
    raise ValueError(f"cannot create exactly {n_steps} DDIM steps out of T={T} with an integer stride")


def ddim_timesteps(n_steps: int, T: int = 1000) -> list[int]:
    return list(range(0, T, ddim_stride(n_steps, T)))


class GaussianDiffusion:
    """Forward process q(x_t | x_0) and the ε-MSE training loss (spec §1.2), on core's MONAI-based scheduler.

    ``const_beta`` gives the constant schedule of the optional latent DDIM (spec §1.4: β = 0.008).
    ``betas`` / ``alphas_cumprod`` are float64 NumPy arrays (the official schedule)."""

    def __init__(
        self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, const_beta: float | None = None
    ):
        self.T = int(T)
        self.schedule_args: dict = (
            {"schedule": "constant_beta", "beta": float(const_beta)}
            if const_beta is not None
            else {"schedule": "linear_beta_rescaled", "beta_start": beta_start, "beta_end": beta_end}
        )
        self.scheduler = self.make_scheduler()
        self.betas = self.scheduler.betas.numpy()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.numpy()

    def make_scheduler(self) -> SpacedDDIMScheduler:
        """DiffAE's DDIM: x̂₀ clipped, ε recomputed from it, ᾱ_next = 0 after the last encoding step."""
        return SpacedDDIMScheduler(self.T, clip_sample=True, recompute_eps=True, final_alpha_next=0.0,
                                   **self.schedule_args)  # fmt: skip

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def sample_t(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randint(0, self.T, (batch,), generator=generator, device=device)

    def loss(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mean over pixels of (ε̂(x_t, t, Enc(x_0)) − ε)²; the encoder is trained end-to-end through it."""
        x_t = self.q_sample(x0, t, noise)
        eps = model(x_t, t, x_start=x0)
        return ((eps - noise) ** 2).mean()

    def sampler(self, n_steps: int) -> DDIMSampler:
        return DDIMSampler(self, n_steps)


class DDIMSampler:
    """Spaced DDIM (η = 0) over ``ddim_timesteps(N)``: decode (x_T → x_0) and stochastic encoding (x_0 → x_T)."""

    def __init__(self, diffusion: GaussianDiffusion, n_steps: int):
        self.scheduler = diffusion.make_scheduler()
        self.scheduler.set_timesteps(timesteps=ddim_timesteps(n_steps, diffusion.T))
        self.timesteps = sorted(self.scheduler.timesteps.tolist())
        self.n_steps = len(self.timesteps)

    def _eps(self, eps_fn: EpsFn, x: torch.Tensor, t: int) -> torch.Tensor:
        return eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))

    def decode(
        self, eps_fn: EpsFn, x_T: torch.Tensor, clip: bool = True, grad: bool = False, return_x0: bool = False
    ) -> torch.Tensor:
        """Deterministic DDIM from x_T (spaced index N−1) down to x_0."""
        s = self.scheduler
        s.clip_sample = clip
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x, x0 = x_T, x_T
            for t in reversed(self.timesteps):
                x, x0 = s.step(self._eps(eps_fn, x, t), t, x)
            return x0 if return_x0 else x

    def encode(self, eps_fn: EpsFn, x0: torch.Tensor, clip: bool = True, grad: bool = False) -> torch.Tensor:
        """Stochastic encoding x_T (reverse DDIM ODE); x_0 is the state at spaced index 0 (spec §1.2)."""
        s = self.scheduler
        s.clip_sample = clip
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = x0
            for t in self.timesteps:
                x, _ = s.reversed_step(self._eps(eps_fn, x, t), t, x)
            return x

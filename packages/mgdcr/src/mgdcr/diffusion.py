"""Own small Gaussian diffusion reproducing the exact DiffAE conventions (spec §1.2, checklist B).

* linear β from 1e-4 to 0.02 (both scaled by 1000/T), ᾱ in float64;
* ``ddimN`` spacing: the smallest integer stride s with ``len(range(0, T, s)) == N``;
* ε-prediction, raw integer t passed to the network (``rescale_timesteps=False``);
* DDIM (η = 0) decode and stochastic encoding (reverse ODE) with x̂₀ clipped to [-1, 1] at every step, and
  ᾱ_next = 0 at the last encoding step so that x_T equals the final ε estimate.

Coefficients are float64 and cast to the tensor dtype when used (as the official ``_extract_into_tensor``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    scale = 1000.0 / T
    return np.linspace(scale * beta_start, scale * beta_end, T, dtype=np.float64)


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
    """Forward process q(x_t | x_0) and the ε-MSE training loss (spec §1.2).

    ``const_beta`` gives the constant schedule of the optional latent DDIM (spec §1.4: β = 0.008)."""

    def __init__(
        self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, const_beta: float | None = None
    ):
        self.T = int(T)
        self.betas = (
            np.full(self.T, float(const_beta), dtype=np.float64)
            if const_beta is not None
            else linear_betas(T, beta_start, beta_end)
        )
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)

    def _coef(self, arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(arr).to(like.device)[t.long()].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod
        return self._coef(np.sqrt(ab), t, x0) * x0 + self._coef(np.sqrt(1.0 - ab), t, x0) * noise

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
    """Spaced DDIM (η = 0) over ``ddim_timesteps(N)``."""

    def __init__(self, diffusion: GaussianDiffusion, n_steps: int):
        self.timesteps = ddim_timesteps(n_steps, diffusion.T)
        self.n_steps = len(self.timesteps)
        ab = diffusion.alphas_cumprod[self.timesteps]
        self.alphas_cumprod = ab
        self.alphas_cumprod_prev = np.append(1.0, ab[:-1])
        self.alphas_cumprod_next = np.append(ab[1:], 0.0)
        self.sqrt_recip = np.sqrt(1.0 / ab)
        self.sqrt_recipm1 = np.sqrt(1.0 / ab - 1.0)

    def _pred_x0_eps(self, eps_fn: EpsFn, x: torch.Tensor, i: int, clip: bool):
        t = torch.full((x.shape[0],), self.timesteps[i], dtype=torch.long, device=x.device)
        eps = eps_fn(x, t)
        r, rm1 = float(self.sqrt_recip[i]), float(self.sqrt_recipm1[i])
        x0 = r * x - rm1 * eps
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        eps = (r * x - x0) / rm1  # ε recomputed from the clipped x̂₀ (official ddim_sample/_reverse_sample)
        return x0, eps

    def decode(
        self, eps_fn: EpsFn, x_T: torch.Tensor, clip: bool = True, grad: bool = False, return_x0: bool = False
    ) -> torch.Tensor:
        """Deterministic DDIM from x_T (spaced index N−1) down to x_0."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = x_T
            x0 = x_T
            for i in reversed(range(self.n_steps)):
                x0, eps = self._pred_x0_eps(eps_fn, x, i, clip)
                ab_prev = float(self.alphas_cumprod_prev[i])
                x = x0 * ab_prev**0.5 + (1.0 - ab_prev) ** 0.5 * eps
            return x0 if return_x0 else x

    def encode(self, eps_fn: EpsFn, x0: torch.Tensor, clip: bool = True, grad: bool = False) -> torch.Tensor:
        """Stochastic encoding x_T (reverse DDIM ODE); x_0 is the state at spaced index 0 (spec §1.2)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            x = x0
            for i in range(self.n_steps):
                xh, eps = self._pred_x0_eps(eps_fn, x, i, clip)
                ab_next = float(self.alphas_cumprod_next[i])
                x = xh * ab_next**0.5 + (1.0 - ab_next) ** 0.5 * eps
            return x

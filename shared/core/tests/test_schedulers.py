"""medsynth_core.schedulers: MONAI's DDPM/DDIM where the conventions agree, the official ones where they do not."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medsynth_core.schedulers import AncestralScheduler, SpacedDDIMScheduler, cosine_clipped, randn


def _eps(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.tanh(0.7 * x) + 1e-3 * t


def test_ddim_equals_monai_where_the_conventions_agree():
    """Stride-50 timesteps, no clipping, the network's ε: every step equals MONAI's ``DDIMScheduler.step``.
    (MONAI 1.6 lists ``linspace(999, 0, N).round()`` but steps to ``t − T // N``; ours steps to the neighbour.)"""
    ours = SpacedDDIMScheduler(1000, "linear_beta", clip_sample=False)
    ref = DDIMScheduler(1000, "linear_beta", clip_sample=False)
    ours.set_timesteps(timesteps=range(0, 1000, 50))
    ref.set_timesteps(20)
    ref.timesteps = torch.arange(950, -1, -50)
    assert ours.timesteps.tolist() == ref.timesteps.tolist()
    ours.set_timesteps(20)  # MONAI's list, stepped to the neighbour
    assert ours.timesteps.tolist()[:2] == [999, 946] and ours._prev[999] == 946
    ours.set_timesteps(timesteps=range(0, 1000, 50))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a, b = x, x
    for t in ours.timesteps.tolist():
        a = ours.step(_eps(a, t), t, a)[0]
        b = ref.step(_eps(b, t), t, b)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - x).abs().max() > 0.1


def test_ddpm_equals_monai_where_the_conventions_agree():
    """Clipped x̂₀, fixed-small variance, the same noise: one ancestral step equals MONAI's ``DDPMScheduler``."""
    ours = AncestralScheduler(100, "linear_beta", clip_sample=True)
    ref = DDPMScheduler(100, "linear_beta", clip_sample=True)
    x = 3.0 * torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in (99, 40, 1, 0):
        a, x0a = ours.step(_eps(x, t), t, x, torch.Generator().manual_seed(t))
        b, x0b = ref.step(_eps(x, t), t, x, torch.Generator().manual_seed(t))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x0a, x0b, rtol=1e-5, atol=1e-5)
        assert x0a.abs().max() <= 1.0
    # t = 0 adds no noise: the generator is not touched
    g = torch.Generator().manual_seed(3)
    ours.step(_eps(x, 0), 0, x, g)
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(3).get_state())


def test_irregular_timesteps_step_to_their_neighbours():
    s = SpacedDDIMScheduler(1000, "linear_beta_rescaled", clip_sample=False)
    ts = list(range(0, 1000, 34))  # a ddim30 stride list: stride 34, not MONAI's 1000 // 30 = 33
    s.set_timesteps(timesteps=ts)
    assert s.timesteps.tolist() == ts[::-1] and s.num_inference_steps == 30
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    eps = _eps(x, 986)
    a_t, a_p = s.alpha_bar(986), s.alpha_bar(952)
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    torch.testing.assert_close(s.step(eps, 986, x)[0], math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps)
    # the last step ends on x̂₀ (ᾱ_prev = 1); inversion ends on ᾱ = final_alpha_next (0: x_T = ε)
    torch.testing.assert_close(s.step(eps, 0, x)[0], s.predict_x0(eps, 0, x))
    torch.testing.assert_close(s.reversed_step(eps, 986, x)[0], eps)
    with pytest.raises(ValueError, match="not one of"):
        s.step(eps, 985, x)
    with pytest.raises(ValueError, match="distinct"):
        s.set_timesteps(timesteps=[0, 5, 5])
    with pytest.raises(ValueError, match=r"lie in \[0, 1000\)"):
        s.set_timesteps(timesteps=[0, 1000])


def test_ddim_inversion_round_trip_with_the_exact_denoiser():
    """Point mass at x*: the exact ε makes encode → decode return x* (up to the ODE's discretisation)."""
    s = SpacedDDIMScheduler(1000, "linear_beta_rescaled", recompute_eps=True)
    s.set_timesteps(timesteps=list(range(0, 1000, 50)))
    x_star = torch.linspace(-1, 1, 11, dtype=torch.float64).reshape(1, 1, 1, 11)

    def eps(x, t):
        a = s.alpha_bar(t)
        return (x - math.sqrt(a) * x_star) / math.sqrt(1 - a)

    x = x_star.clone()
    for t in sorted(s.timesteps.tolist()):
        x = s.reversed_step(eps(x, t), t, x)[0]
    for t in s.timesteps.tolist():
        x = s.step(eps(x, t), t, x)[0]
    assert (x - x_star).abs().max() < 1e-5


def test_recomputed_eps_only_differs_where_clipping_bites():
    kw = dict(num_train_timesteps=100, schedule="cosine_clipped")
    net, fixed = SpacedDDIMScheduler(**kw), SpacedDDIMScheduler(**kw, recompute_eps=True)
    for s in (net, fixed):
        s.set_timesteps(timesteps=[30, 60])
    small = 0.1 * torch.randn(2, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(net.step(_eps(small, 5), 60, small)[0], fixed.step(_eps(small, 5), 60, small)[0])
    big = torch.full((1, 1, 4, 4), 3.0, dtype=torch.float64)
    assert (net.step(_eps(big, 60), 60, big)[0] - fixed.step(_eps(big, 60), 60, big)[0]).abs().max() > 0.1


def test_schedules_in_float64_and_add_noise_keeps_them():
    s = AncestralScheduler(1000, "cosine_clipped")
    assert s.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(s.betas, cosine_clipped(1000))
    assert s.betas[-1].item() == pytest.approx(0.9999)
    x, n = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = s.add_noise(x, n, t)
    assert xt.dtype == torch.float32 and s.alphas_cumprod.dtype == torch.float64  # MONAI's casts it
    a = s.alpha_bar(500)
    torch.testing.assert_close(xt[1], math.sqrt(a) * x[1] + math.sqrt(1 - a) * n[1])
    c = SpacedDDIMScheduler(10, "constant_beta", beta=0.008)
    torch.testing.assert_close(c.alphas_cumprod[[0, 9]], torch.tensor([0.992, 0.992**10], dtype=torch.float64))
    d = SpacedDDIMScheduler(500, "linear_beta_rescaled")  # both ends scaled by 1000 / T
    torch.testing.assert_close(d.betas[[0, -1]], torch.tensor([2e-4, 0.04], dtype=torch.float64))


def test_per_sample_generators_make_a_batch_equal_its_elements():
    s = AncestralScheduler(50, "cosine_clipped")
    x = torch.randn(2, 1, 4, 4)
    both = s.step(_eps(x, 20), 20, x, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])[0]
    for i, seed in enumerate((1, 2)):
        one = s.step(_eps(x[i : i + 1], 20), 20, x[i : i + 1], [torch.Generator().manual_seed(seed)])[0]
        torch.testing.assert_close(both[i : i + 1], one, rtol=0, atol=0)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        randn((2, 4), [torch.Generator()] * 3)

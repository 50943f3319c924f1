"""Checklist B (diffusion maths)."""

import numpy as np
import pytest
import torch

from mgdcr.diffusion import GaussianDiffusion, ddim_stride, ddim_timesteps
from mgdcr.model import DiffAE, preset


def test_b1_linear_betas_and_alpha_bar():
    d = GaussianDiffusion()
    np.testing.assert_allclose(d.betas[[0, -1]], [1e-4, 0.02], rtol=1e-12)
    assert np.allclose(np.diff(d.betas, 2), 0, atol=1e-15)
    ab = d.alphas_cumprod
    assert abs(ab[0] / 0.9999 - 1) < 1e-4
    assert abs(ab[986] / 5.2397e-5 - 1) < 1e-4
    assert abs(ab[999] / 4.0358e-5 - 1) < 1e-4
    # T != 1000 rescales both ends by 1000/T (DiffAE get_named_beta_schedule)
    np.testing.assert_allclose(GaussianDiffusion(T=500).betas[[0, -1]], [2e-4, 0.04], rtol=1e-12)


def test_b2_ddim_strides():
    assert [ddim_stride(n) for n in (20, 30, 100)] == [50, 34, 10]
    assert ddim_timesteps(30)[-1] == 986 and ddim_timesteps(20)[-1] == 950
    assert len(ddim_timesteps(30)) == 30
    with pytest.raises(ValueError, match="integer stride"):
        ddim_stride(999)


@pytest.mark.parametrize("n", [5, 20, 30])
def test_b3_point_mass_oracle_round_trip(n):
    d = GaussianDiffusion()
    ab = torch.from_numpy(d.alphas_cumprod)
    x_star = torch.linspace(-1, 1, 11, dtype=torch.float64).reshape(1, 1, 1, 11)

    def eps(x, t):
        a = ab[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x_star) / (1 - a).sqrt()

    s = d.sampler(n)
    xr = s.decode(eps, s.encode(eps, x_star.clone()))
    assert (xr - x_star).abs().max() < 1e-5


def test_b4_gaussian_oracle_k_values():
    d = GaussianDiffusion()
    ab = torch.from_numpy(d.alphas_cumprod)
    sd = 0.3

    def eps(x, t):
        a = ab[t].reshape(-1, 1)
        return (1 - a).sqrt() * x / (a * sd**2 + 1 - a)

    ks = []
    for n, ref in ((10, 0.5967), (30, 0.2568), (100, 0.0839), (1000, 0.00967)):
        s = d.sampler(n)
        x0 = torch.tensor([[0.7], [-0.2]], dtype=torch.float64)
        xr = s.decode(eps, s.encode(eps, x0, clip=False), clip=False)
        k = xr / x0
        assert torch.allclose(k[0], k[1], rtol=1e-10)  # the round trip is a scalar map
        err = abs(1 - k[0].item())
        assert abs(err / ref - 1) < 0.01, (n, err)
        ks.append(err)
    assert ks == sorted(ks, reverse=True)


def test_b5_determinism_and_no_graph():
    torch.manual_seed(0)
    m = DiffAE(preset("micro")).eval()
    for p in m.parameters():  # non-trivial network output
        torch.nn.init.normal_(p, std=0.05)
    d = GaussianDiffusion()
    s = d.sampler(5)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    z = m.encode(x).detach()
    xt = s.encode(m.eps_fn(z), x)
    assert not xt.requires_grad and xt.grad_fn is None
    a = s.decode(m.eps_fn(z), xt)
    b = s.decode(m.eps_fn(z), xt)
    assert a.grad_fn is None
    assert torch.equal(a, b)
    assert a.abs().max() <= 1.0  # x̂₀ is clipped
    xg = xt.clone().requires_grad_(True)
    out = s.decode(m.eps_fn(z, use_checkpoint=True), xg, grad=True)
    out.sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(out.detach(), a)


def test_training_loss_matches_hand_computation():
    torch.manual_seed(0)
    m = DiffAE(preset("micro"))
    d = GaussianDiffusion()
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([3, 700])
    # the fresh UNet predicts 0, so the loss is mean(ε²)
    assert torch.isclose(d.loss(m, x0, t, noise), (noise**2).mean())
    xt = d.q_sample(x0, t, noise)
    a = float(d.alphas_cumprod[700])
    torch.testing.assert_close(xt[1], a**0.5 * x0[1] + (1 - a) ** 0.5 * noise[1])


def test_diffae_convenience_api_matches_sampler():
    torch.manual_seed(0)
    m = DiffAE(preset("micro")).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    d = GaussianDiffusion()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    xt, z = m.encode_stochastic(x, steps=5)
    s = d.sampler(5)
    torch.testing.assert_close(xt, s.encode(m.eps_fn(m.encode(x)), x), rtol=0, atol=0)
    torch.testing.assert_close(m.decode(xt, z, steps=5), s.decode(m.eps_fn(z), xt), rtol=0, atol=0)
    assert xt.grad_fn is None and z.grad_fn is None
    torch.manual_seed(1)
    loss = m.loss(x)
    assert loss.ndim == 0 and torch.isfinite(loss)

"""Gaussian diffusion (spec §3; checklist item 11) and the model EMA (item 14)."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from meddiffusion3d.biflownet import BiFlowNet, resolution_code
from meddiffusion3d.diffusion import GaussianDiffusion, ModelEMA, cosine_beta_schedule, randn

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import BIFLOW_DEMO as DEMO  # noqa: E402
from md3d_testutils import REF


def _toy_eps(x, t, y=None, res=None, **kw):
    """A deterministic, batch-independent stand-in denoiser."""
    return 0.3 * x + 0.001 * t.float().reshape(-1, *([1] * (x.ndim - 1)))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    n = BiFlowNet(**DEMO).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in n.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return n


# ----------------------------------------------------------------------------------------------- schedule
def test_schedule_values():
    d = GaussianDiffusion(1000)
    assert d.betas[0].item() == pytest.approx(4.128e-5, rel=1e-3)
    assert d.betas[-1].item() == pytest.approx(0.9999, rel=1e-7)
    assert d.alphas_cumprod[-1].item() == pytest.approx(2.43e-10, rel=2e-3)
    assert cosine_beta_schedule(1000).dtype == torch.float64


def test_schedule_matches_official_buffers():
    p = REF / "official_tiny.pt"
    if not p.exists():
        pytest.skip(f"official fixture {p} not available")
    fx = torch.load(p, map_location="cpu", weights_only=True)["gaussian_diffusion_schedule"]
    d = GaussianDiffusion(fx["constructor"]["timesteps"], loss=fx["constructor"]["loss_type"])
    ours = d.state_dict()
    assert set(ours) == set(fx["state_dict"])
    for k, v in fx["state_dict"].items():
        torch.testing.assert_close(ours[k], v, rtol=1e-6, atol=1e-12, msg=k)


# ----------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_loss_follows_config(kind):
    d = GaussianDiffusion(100, loss=kind)
    x0 = torch.rand(2, 4, 4, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([5, 80])
    seen = {}

    def fn(x, tt, y=None, res=None):
        seen["x"], seen["t"] = x, tt
        return torch.zeros_like(x)

    loss = d.training_loss(fn, x0, t=t, noise=noise)
    expect = noise.abs().mean() if kind == "l1" else noise.square().mean()
    torch.testing.assert_close(loss, expect)
    a = d.alphas_cumprod[t].reshape(2, 1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], a.sqrt() * x0 + (1 - a).sqrt() * noise)
    with pytest.raises(ValueError, match="l1"):
        GaussianDiffusion(10, loss="huber")
    with pytest.raises(ValueError, match="NaN"):
        d.training_loss(fn, x0 * float("nan"))


def test_loss_backprops_through_biflownet(net):
    d = GaussianDiffusion(100)
    x0 = torch.rand(2, 4, 8, 8, 8) * 2 - 1
    n = BiFlowNet(**DEMO)
    loss = d.training_loss(
        n,
        x0,
        y=torch.tensor([0, 1]),
        res=resolution_code((8, 8, 8), 2),
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    assert torch.isfinite(loss) and n.stem.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------- samplers
def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize(
    "sampler,kw", [("ddpm", {}), ("ddim", {"steps": 5, "eta": 0.0}), ("ddim", {"steps": 5, "eta": 1.0})]
)
def test_batch_of_two_equals_two_singles(net, sampler, kw):
    """Float64, because x̂₀ = x_t/√ᾱ_t amplifies float32 batch-vs-single rounding near t = T−1."""
    d = GaussianDiffusion(10)
    net = copy.deepcopy(net).double()
    z = randn((2, 4, 8, 8, 8), _gens([10, 11]), dtype=torch.float64)
    y, res = torch.tensor([0, 1]), resolution_code((8, 8, 8), 2).double()
    both = d.sample(net, z, sampler, y=y, res=res, generator=_gens([1, 2]), **kw)
    assert both.shape == z.shape and torch.isfinite(both).all()
    for i, s in enumerate([1, 2]):
        one = d.sample(
            net, z[i : i + 1], sampler, y=y[i : i + 1], res=res[i : i + 1], generator=_gens([s]), **kw
        )
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-9, atol=1e-9)


def test_ddim_eta0_deterministic_and_eta_matters(net):
    d = GaussianDiffusion(10)
    z = torch.randn(1, 4, 8, 8, 8)
    y, res = torch.tensor([1]), resolution_code((8, 8, 8))
    a = d.sample_ddim(net, z, 4, 0.0, y=y, res=res, generator=torch.Generator().manual_seed(0))
    b = d.sample_ddim(net, z, 4, 0.0, y=y, res=res, generator=torch.Generator().manual_seed(99))
    assert torch.equal(a, b)
    c = d.sample_ddim(net, z, 4, 1.0, y=y, res=res, generator=torch.Generator().manual_seed(0))
    assert (a - c).abs().max() > 1e-3


def test_ddim_eta1_full_steps_equals_ddpm():
    """With eta = 1 and every timestep, DDIM is the ancestral sampler (σ² = β̃): checks the σ fix of spec §6.8.
    DDPM's posterior mean uses x_t itself, i.e. the ε of the clipped x̂₀, so with clipping the equality needs
    ``ddim_recompute_eps``; without clipping the network's ε (official default) is that ε."""
    z = torch.randn(3, 2, 4, 4, 4)
    for d in (GaussianDiffusion(50, ddim_recompute_eps=True), GaussianDiffusion(50, clip_denoised=False)):
        a = d.sample_ddpm(_toy_eps, z, generator=torch.Generator().manual_seed(5))
        b = d.sample_ddim(_toy_eps, z, 50, eta=1.0, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_eps_official_by_default_recomputed_by_flag():
    """Official ``p_sample_ddim``: x_prev = √ᾱ_prev·clip(x̂₀) + √(1−ᾱ_prev)·ε_net. The flag replaces ε_net by
    (x_t − √ᾱ_t·clip(x̂₀))/√(1−ᾱ_t). Both agree when clipping does not bite."""
    x = torch.full((2, 1, 4, 4, 4), 3.0)  # x̂₀ = (x − √(1−ᾱ)·0.3x)/√ᾱ far outside [-1, 1]
    t, tp = 60, 30
    ac = GaussianDiffusion(100).alphas_cumprod.double()
    a_t, a_p = float(ac[t]), float(ac[tp])
    eps = _toy_eps(x, torch.full((2,), t))
    x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
    official = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    recomputed = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    out_default = GaussianDiffusion(100).ddim_step(_toy_eps, x, t, tp)
    out_flag = GaussianDiffusion(100, ddim_recompute_eps=True).ddim_step(_toy_eps, x, t, tp)
    torch.testing.assert_close(out_default, official, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_flag, recomputed, rtol=1e-5, atol=1e-5)
    assert (out_default - out_flag).abs().max() > 0.1
    small = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    torch.testing.assert_close(
        GaussianDiffusion(100).ddim_step(_toy_eps, small, 5, 2),
        GaussianDiffusion(100, ddim_recompute_eps=True).ddim_step(_toy_eps, small, 5, 2),
        rtol=1e-5,
        atol=1e-5,
    )
    from meddiffusion3d.config import Config, build_diffusion

    assert build_diffusion(Config()).ddim_recompute_eps is False


def test_ddim_last_step_returns_x0_prediction():
    """The official last step used ᾱ₀ instead of 1 (spec §6.8); ours ends exactly on x̂₀."""
    d = GaussianDiffusion(100, clip_denoised=False)
    x = torch.randn(2, 1, 4, 4, 4)
    out = d.ddim_step(_toy_eps, x, 0, -1)
    t0 = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(out, d.predict_start_from_noise(x, t0, _toy_eps(x, t0)))
    assert d.ddim_timesteps(10)[0] == 99 and d.ddim_timesteps(10)[-1] == 0


def test_sampler_validation():
    d = GaussianDiffusion(10)
    with pytest.raises(ValueError, match="sampler"):
        d.sample(_toy_eps, torch.zeros(1, 1, 4, 4, 4), "euler")
    with pytest.raises(ValueError, match="DDIM steps"):
        d.ddim_timesteps(11)


# ----------------------------------------------------------------------------------------------- CFG
def test_cfg_off_by_default_single_call():
    calls = []

    def fn(x, t, y=None, res=None):
        calls.append(y)
        return torch.zeros_like(x)

    d = GaussianDiffusion(10)
    d.sample_ddim(fn, torch.zeros(1, 1, 4, 4, 4), 3, y=torch.tensor([0]))
    assert len(calls) == 3
    with pytest.raises(ValueError, match="null class"):
        d.sample_ddim(fn, torch.zeros(1, 1, 4, 4, 4), 3, y=torch.tensor([0]), guidance_scale=2.0)


def test_cfg_guidance_and_condition_dropout():
    d = GaussianDiffusion(10, cond_drop_prob=0.5, null_class=7)

    def fn(x, t, y=None, res=None):
        return torch.ones_like(x) * y.float().reshape(-1, 1, 1, 1, 1)

    x, t, y = torch.zeros(2, 1, 2, 2, 2), torch.tensor([3, 3]), torch.tensor([1, 2])
    eps = d.model_eps(fn, x, t, y, None, None, guidance_scale=3.0)
    expect = 7 + 3.0 * (torch.tensor([1.0, 2.0]) - 7)
    torch.testing.assert_close(eps[:, 0, 0, 0, 0], expect)
    seen = []

    def spy(x, t, y=None, res=None):
        seen.append(y.clone())
        return torch.zeros_like(x)

    d.training_loss(
        spy,
        torch.zeros(64, 1, 2, 2, 2),
        y=torch.zeros(64, dtype=torch.long),
        generator=torch.Generator().manual_seed(0),
    )
    frac = (seen[0] == 7).float().mean().item()
    assert 0.3 < frac < 0.7 and set(seen[0].tolist()) <= {0, 7}
    with pytest.raises(ValueError, match="null_class"):
        GaussianDiffusion(10, cond_drop_prob=0.1)


def test_biflownet_null_class_row():
    n = BiFlowNet(**{**DEMO, "null_class": True})
    assert n.class_embed.num_embeddings == 3
    x = torch.randn(1, 4, 8, 8, 8)
    assert n(x, torch.tensor([1]), y=torch.tensor([2]), res=resolution_code((8, 8, 8))).shape == x.shape


# ----------------------------------------------------------------------------------------------- item 14
def test_model_ema_rule():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ModelEMA(model)  # decay 0.995, every 10 steps, plain copy before step 2000
    assert ema.module is not model and not any(p.requires_grad for p in ema.module.parameters())

    def bump():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)

    bump()
    assert ema.step(model, 7) is None
    assert not torch.equal(ema.module.weight, model.weight)
    assert ema.step(model, 1990) == "copy"
    assert torch.equal(ema.module.weight, model.weight)
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    bump()
    assert ema.step(model, 2005) is None
    assert ema.step(model, 2000) == "ema"
    for k, v in model.state_dict().items():
        torch.testing.assert_close(
            ema.module.state_dict()[k], 0.995 * old[k] + 0.005 * v, rtol=1e-6, atol=1e-6
        )
    state = ema.state_dict()
    ema2 = ModelEMA(torch.nn.Linear(3, 2))
    ema2.load_state_dict(state)
    assert torch.equal(ema2.module.weight, ema.module.weight) and ema2.start_step == 2000

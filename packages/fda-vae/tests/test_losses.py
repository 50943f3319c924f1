"""Spec §7 item 5: loss units, FDA alignment, weighted generator objective; perceptual options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fda_vae.config import LossConfig
from fda_vae.losses import (
    PerceptualLoss,
    discriminator_loss,
    fda_alignment,
    generator_loss,
    kl_divergence,
    patch_bce,
)
from fda_vae.model import FDAVAE, build_discriminator
from medsynth_core.cli import UserError


@pytest.mark.parametrize("from_logvar", [True, False])
def test_kl_units(from_logvar):
    mu = torch.zeros(3, 4, 5, 6)
    logvar = torch.zeros_like(mu)
    assert float(kl_divergence(mu, logvar, from_logvar=from_logvar)) == 0.0
    kl1 = kl_divergence(torch.ones_like(mu), logvar, from_logvar=from_logvar)
    assert float(kl1) == pytest.approx(0.5 * 4 * 5 * 6)
    # both behaviours agree numerically (spec §6.12) but differ in how log σ² is obtained
    lv = torch.randn(2, 4, 5, 6)
    m = torch.randn(2, 4, 5, 6)
    a = kl_divergence(m, lv, from_logvar=True)
    b = kl_divergence(m, lv, from_logvar=False)
    hand = 0.5 * (m**2 + lv.exp() - lv - 1).flatten(1).sum(1).mean()
    torch.testing.assert_close(a, hand)
    torch.testing.assert_close(b, hand, rtol=1e-5, atol=1e-4)


def test_fda_alignment_zero_and_value():
    mu = torch.randn(2, 4, 8, 8)
    sigma = torch.rand(2, 4, 8, 8) + 0.1
    assert float(fda_alignment(mu, sigma, -mu, sigma)) == 0.0
    val = fda_alignment(mu, sigma, mu, sigma * 2)
    torch.testing.assert_close(val, 0.5 * (2 * mu).abs().mean() + (3 * sigma**2).abs().mean())


def test_patch_bce_and_d_loss():
    logits = torch.zeros(2, 1, 3, 3)
    assert float(patch_bce(logits, True)) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-6)
    torch.manual_seed(0)
    d = build_discriminator(num_layers_d=2, channels=8).eval()
    real, fake = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    joint = discriminator_loss(d, real, fake)
    sep = 0.5 * (patch_bce(d(fake)[-1], False) + patch_bce(d(real)[-1], True))
    torch.testing.assert_close(joint, sep, rtol=1e-5, atol=1e-6)


def test_generator_loss_is_weighted_sum(paper_cfg):
    cfg = paper_cfg.loss
    assert (cfg.w_rec, cfg.w_trans, cfg.w_kl, cfg.w_fda, cfg.w_perc, cfg.w_adv) == (
        0.01,
        1.0,
        1e-7,
        0.01,
        0.01,
        0.01,
    )
    cfg = LossConfig(**{**vars(cfg), "perceptual": "resnet50-random"})
    torch.manual_seed(0)
    g = FDAVAE(channels=(8, 16), num_res_blocks=1, latent_channels=4, norm_num_groups=4)
    da, db = build_discriminator(num_layers_d=2, channels=8), build_discriminator(num_layers_d=2, channels=8)
    xa, xb = torch.rand(2, 1, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    oa, ob = g(xa, "a"), g(xb, "b")
    perc = PerceptualLoss("resnet50-random", seed=0)
    out = generator_loss(cfg, oa, ob, xa, xb, da, db, perc)
    t = out.terms
    # each term by hand
    torch.testing.assert_close(t["rec"], 0.5 * (F.l1_loss(ob.own, xb) + F.l1_loss(oa.own, xa)))
    torch.testing.assert_close(t["trans"], 0.5 * (F.l1_loss(oa.cross, xb) + F.l1_loss(ob.cross, xa)))
    torch.testing.assert_close(
        t["adv"], 0.5 * (patch_bce(db(oa.cross)[-1], True) + patch_bce(da(ob.cross)[-1], True))
    )
    torch.testing.assert_close(t["perc"], 0.5 * (perc(ob.cross, xa) + perc(oa.cross, xb)))
    assert float(t["perc"].detach()) > 0 and float(t["adv"].detach()) > 0
    w = {"rec": 0.01, "trans": 1.0, "kl": 1e-7, "fda": 0.01, "perc": 0.01, "adv": 0.01}
    torch.testing.assert_close(out.total, sum(w[k] * t[k] for k in w))
    # weights are read from the config
    cfg2 = LossConfig(**{**vars(cfg), "w_trans": 2.0, "w_adv": 0.0})
    out2 = generator_loss(cfg2, oa, ob, xa, xb, da, db, perc)
    torch.testing.assert_close(out2.total, out.total + t["trans"] - 0.01 * t["adv"])


def test_perceptual_random_is_seeded_offline_and_keeps_rng(monkeypatch):
    import torch.hub

    def no_download(*a, **k):
        raise AssertionError("PerceptualLoss tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    state = torch.get_rng_state()
    p1, p2 = PerceptualLoss("resnet50-random", seed=3), PerceptualLoss("resnet50-random", seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # construction does not move the global RNG
    w1 = next(p1.net.parameters())
    assert torch.equal(w1, next(p2.net.parameters()))
    assert not torch.equal(w1, next(PerceptualLoss("resnet50-random", seed=4).net.parameters()))
    assert not any(p.requires_grad for p in p1.parameters())
    assert sum(p.numel() for p in p1.parameters()) == 23_508_032
    x = torch.rand(1, 1, 32, 32)
    assert float(p1(x, x)) == pytest.approx(0.0, abs=1e-6)


def test_perceptual_none_and_missing_weights():
    p = PerceptualLoss("none")
    assert float(p(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))) == 0.0
    with pytest.raises(UserError, match="not found"):
        PerceptualLoss("resnet50-pretrained", weights="/nonexistent/resnet50.pth")


def test_perceptual_pretrained_from_local_file(tmp_path):
    import torchvision

    torch.manual_seed(11)
    path = tmp_path / "resnet50-local.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    p = PerceptualLoss("resnet50-pretrained", weights=str(path))
    ref = torch.load(path, weights_only=True)["conv1.weight"]
    assert torch.equal(p.net.perceptual_function.model.conv1.weight, ref)
    assert not torch.equal(next(PerceptualLoss("resnet50-random", seed=0).net.parameters()), ref)

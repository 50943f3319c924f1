"""Spec §8.8 (SAM) and §8.9 (loss bookkeeping, blur, EMA, LR policy Q1)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from medsynth_core.cli import UserError
from uni_coal import losses as L
from uni_coal.config import SamConfig
from uni_coal.sam import SamGuidance, _vit, build_sam, mosaic


def test_r1_term_is_five_times_mean_grad_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 5, 8, 8, generator=g)

    def dnet(img, c, idx):  # linear D: gradient wrt the input is w for every sample
        return (img * w).sum([1, 2, 3])[:, None]

    real, fake = torch.randn(3, 5, 8, 8, generator=g), torch.randn(3, 5, 8, 8, generator=g)
    out = L.d_loss(dnet, real, fake, None, None, sigma=0.0, r1_gamma=10.0)
    r1 = w.square().sum()
    assert out["D_r1"].item() == pytest.approx(0.5 * r1.item(), rel=1e-5)
    assert (out["D"] - out["D_fake"] - out["D_real"]).item() == pytest.approx(5 * r1.item(), rel=1e-5)
    assert out["D_fake"].item() == pytest.approx(F.softplus(dnet(fake, 0, 0)).mean().item(), rel=1e-6)


def test_blur_schedule_and_application():
    assert L.blur_sigma(0, 10, 200_000) == 10
    assert L.blur_sigma(100_000, 10, 200_000) == 5
    assert L.blur_sigma(200_000, 10, 200_000) == 0 and L.blur_sigma(300_000, 10, 200_000) == 0
    x = torch.zeros(1, 1, 21, 21)
    x[..., 10, 10] = 1
    y = L.blur(x, 1.0)
    f = torch.tensor([2 ** -(i**2) for i in range(-3, 4)], dtype=torch.float32)
    f = f / f.sum()
    torch.testing.assert_close(y[0, 0, 7:14, 7:14], torch.outer(f, f), rtol=0, atol=1e-7)
    assert torch.equal(L.blur(x, 0.2), x)  # radius floor(0.6) = 0 -> identity

    seen = {}

    def dnet(img, c, idx):
        seen["d"] = img
        return img.mean([1, 2, 3])[:, None]

    def sam(fk, rl):
        seen["sam"] = (fk, rl)
        return (fk - rl).abs().mean()

    g = torch.Generator().manual_seed(1)
    a, b, fake = (
        torch.rand(2, 4, 16, 16, generator=g),
        torch.rand(2, 1, 16, 16, generator=g),
        torch.rand(2, 1, 16, 16, generator=g),
    )
    out = L.g_loss(dnet, a, b, fake, None, None, sigma=1.5, lambda_l1=80, lambda_sam=100, sam=sam)
    torch.testing.assert_close(seen["d"], L.blur(torch.cat([a, fake], 1), 1.5))
    torch.testing.assert_close(seen["sam"][0], L.blur(fake, 1.5))
    torch.testing.assert_close(seen["sam"][1], L.blur(b, 1.5))
    want_l1 = (L.blur(fake, 1.5) - L.blur(b, 1.5)).abs().mean() * 80
    assert out["G_l1"].item() == pytest.approx(want_l1.item(), rel=1e-6)
    assert out["G"].item() == pytest.approx((out["G_gan"] + out["G_l1"] + out["G_sam"]).item(), rel=1e-6)


def test_ema_beta_and_lr_policy(demo_cfg):
    assert L.ema_beta(16, 10_000) == pytest.approx(0.5 ** (16 / 10_000))
    assert L.ema_beta(16, 10_000) == pytest.approx(0.99889, abs=1e-5)
    from uni_coal.train import Trainer

    demo_cfg.loss.lambda_sam = 0
    tr = Trainer(demo_cfg)
    assert tr.ema.decay == pytest.approx(0.5 ** (4 / 200))
    tr.set_epoch_lr(0)
    lr1 = tr.opt_G.param_groups[0]["lr"]
    tr.set_epoch_lr(99)
    assert tr.opt_G.param_groups[0]["lr"] == lr1 == demo_cfg.optim.lr_g  # faithful (Q1): constant
    demo_cfg.optim.lr_policy = "linear"
    tr = Trainer(demo_cfg)
    tr.set_epoch_lr(0)
    assert tr.opt_D.param_groups[0]["lr"] == demo_cfg.optim.lr_d
    tr.set_epoch_lr(99)
    assert tr.opt_D.param_groups[0]["lr"] == pytest.approx(demo_cfg.optim.lr_d * (1 - 50 / 51))
    assert isinstance(tr.opt_G.param_groups[0]["betas"][0], float)


def test_mosaic_layout_and_vit_b_shapes():
    x = torch.arange(16.0).view(16, 1, 1, 1).expand(16, 1, 2, 2)
    m = mosaic(x)
    assert m.shape == (1, 1, 8, 8)
    assert m[0, 0, 2, 4].item() == 1 * 4 + 2  # row j=1, column i=2 -> sample j*k+i
    with pytest.raises(ValueError, match="square batch"):
        mosaic(torch.zeros(5, 1, 2, 2))
    assert mosaic(torch.zeros(5, 1, 2, 2), pad=True).shape == (1, 1, 6, 6)  # Q3 fix flag
    with torch.device("meta"):
        s = SamGuidance(SamConfig(), _vit(SamConfig()), False)
        pre = s.preprocess(torch.empty(16, 1, 256, 256))
        emb = s.encoder(pre)
    assert tuple(pre.shape) == (1, 3, 1024, 1024)
    assert tuple(emb.shape) == (1, 256, 64, 64)
    assert sum(p.numel() for p in s.encoder.parameters()) == 89_670_912


def test_sam_frozen_but_contributes_gradient(demo_cfg):
    from uni_coal.data import SliceDataset, build_volumes
    from uni_coal.train import Trainer

    tr = Trainer(demo_cfg)
    before = {k: v.clone() for k, v in tr.sam.state_dict().items()}
    assert all(not p.requires_grad for p in tr.sam.parameters()) and not tr.sam.training
    ds = SliceDataset(build_volumes(demo_cfg.data, "train"), demo_cfg.data)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    out = tr.step(batch, 0)
    assert out["G_sam"] > 0
    assert all(torch.equal(v, tr.sam.state_dict()[k]) for k, v in before.items())
    # the G gradient receives a SAM term
    g = tr.G
    z = torch.randn(4, demo_cfg.generator.z_dim)
    grads = []
    for lam in (0.0, 100.0):
        g.zero_grad()
        fake = g.eval()(z, batch["c"], batch["delta"], batch["A"])
        L.g_loss(tr.D, batch["A"], batch["B"], fake, batch["c"], batch["delta"], 0.0, 80, lam, tr.sam)[
            "G"
        ].backward()
        grads.append(g.synthesis.L0_24_32.weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() > 0


def test_sam_policy(demo_cfg, tmp_path):
    with pytest.raises(UserError, match="SAM weights not found"):
        build_sam(dataclasses.replace(demo_cfg.sam, allow_random=False))
    from uni_coal.train import train

    demo_cfg.data.kind = "h5"
    demo_cfg.sam.allow_random = False
    with pytest.raises(UserError, match="SAM weights not found"):
        train(demo_cfg, run_dir=tmp_path / "r", max_steps=1, quiet=True)


def test_sam_checkpoint_loading(demo_cfg, tmp_path):
    torch.manual_seed(5)
    src = _vit(demo_cfg.sam)
    full = {f"image_encoder.{k}": v for k, v in src.state_dict().items()}
    full["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.zeros(2, 64)
    torch.save(full, tmp_path / "sam.pth")
    cfg = dataclasses.replace(demo_cfg.sam, checkpoint=str(tmp_path / "sam.pth"), allow_random=False)
    s = build_sam(cfg)
    assert s.is_pretrained
    assert all(torch.equal(v, s.encoder.state_dict()[k]) for k, v in src.state_dict().items())
    torch.save({"image_encoder.blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(UserError, match="SAM"):
        build_sam(dataclasses.replace(cfg, checkpoint=str(tmp_path / "bad.pth")))

"""Checklist 6: tri-plane perceptual (zero on identical inputs, symmetric, ⌊0.2n⌋ slices per plane, LPIPS
dropout pinned off), hinge D/G, GAN/feature matching exactly 0 before s_D, total = 4·L1 + commit + 2·TP (+ GAN)."""

import pytest
import torch
import torch.nn.functional as F

from meddiffusion3d.config import AEConfig
from meddiffusion3d.discriminator import NLayerDiscriminator3D
from meddiffusion3d.losses import AELoss, TinyRandomPerceptual, TriPlanePerceptual, hinge_d_loss


class _Counting(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, a, b):
        self.sizes.append((a.shape[0], tuple(a.shape[2:])))
        return self.net(a, b)


def test_triplane_zero_symmetric_and_slice_counts():
    net = _Counting(TinyRandomPerceptual())
    tp = TriPlanePerceptual(net, ratio=0.2)
    x, y = torch.rand(2, 1, 10, 15, 20) * 2 - 1, torch.rand(2, 1, 10, 15, 20) * 2 - 1
    assert tp(x, x).item() == 0.0
    # per plane: ⌊0.2·B·n⌋ slices of the two remaining axes
    assert net.sizes == [(4, (15, 20)), (6, (10, 20)), (8, (10, 15))]
    torch.manual_seed(3)
    a = tp(x, y)
    torch.manual_seed(3)
    b = tp(y, x)
    assert a.item() > 0 and torch.allclose(a, b)


def test_triplane_matches_manual_sum_of_plane_means():
    net = TinyRandomPerceptual()
    tp = TriPlanePerceptual(net, ratio=0.5)
    x, y = torch.rand(1, 1, 4, 6, 8), torch.rand(1, 1, 4, 6, 8)
    torch.manual_seed(0)
    got = tp(x, y)
    torch.manual_seed(0)
    want = 0
    for axis in range(3):
        xs, ys = tp.plane_slices(x, axis), tp.plane_slices(y, axis)
        idx = torch.randperm(xs.shape[0])[: xs.shape[0] // 2]
        want = want + net(xs[idx], ys[idx]).mean()
    torch.testing.assert_close(got, want)


def test_lpips_vgg_random_backbone_and_dropout_flag():
    with pytest.warns(RuntimeWarning, match="RANDOM VGG16"):
        loss = AELoss(AEConfig(perceptual="lpips_vgg"))
    loss.train()
    drops = [m for m in loss.perceptual.net.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(not m.training for m in drops)  # §6.2 fix: dropout pinned off
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    assert loss.perceptual(x, x).item() == 0.0
    with pytest.warns(RuntimeWarning):
        official = AELoss(AEConfig(perceptual="lpips_vgg", perceptual_eval=False))
    official.train()
    assert any(m.training for m in official.perceptual.net.modules() if isinstance(m, torch.nn.Dropout))


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0, -1.0]), torch.tensor([-2.0, 0.0, 0.5])
    want = 0.5 * ((0.5 + 0.0 + 2.0) / 3 + (0.0 + 1.0 + 1.5) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(want)
    lf = AELoss(AEConfig(perceptual="none"))
    d, logs = lf.discriminator(real, fake)
    assert d.item() == pytest.approx(2 * want)  # gan_w · hinge


def test_generator_total_and_gan_switch():
    torch.manual_seed(0)
    cfg = AEConfig(perceptual="random_tiny_2d", disc_channels=4, disc_layers=2)
    lf = AELoss(cfg)
    disc = NLayerDiscriminator3D(1, 4, 2)
    x, xr = torch.rand(2, 1, 16, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16, 16) * 2 - 1
    vq = {"commitment_loss": torch.tensor(0.3), "perplexity": torch.tensor(5.0)}
    torch.manual_seed(1)
    before, logs = lf.generator(x, xr, vq, disc, step=5, disc_start=5, stage=1)  # step == s_D: still off
    assert logs["g_adv"].item() == 0.0 and logs["feat_match"].item() == 0.0
    torch.manual_seed(1)
    tp = lf.perceptual(x, xr)
    torch.testing.assert_close(before, 4 * F.l1_loss(xr, x) + 0.3 + 2 * tp)
    torch.manual_seed(1)
    after, logs = lf.generator(x, xr, vq, disc, step=6, disc_start=5, stage=1)
    with torch.no_grad():
        lfake, ffake = disc(xr)
        _, freal = disc(x)
    fm = sum(F.l1_loss(a, b) for a, b in zip(ffake[:-1], freal[:-1]))
    assert len(ffake) - 1 == 3
    torch.testing.assert_close(after, before + 2 * (-lfake.mean()) + 4 * fm, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    s2, _ = lf.generator(x, xr, vq, disc, step=5, disc_start=5, stage=2)  # stage 2 drops the commitment
    torch.testing.assert_close(s2, before - 0.3)

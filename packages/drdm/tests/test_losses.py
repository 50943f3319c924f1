import pytest
import torch

from drdm.deform import DeformationDiffusion
from drdm.losses import (
    angle_loss,
    distance_loss,
    drdm_loss,
    official_negdetj,
    recovery_target_warp,
    regularisation_loss,
    true_jacobian_det,
)


def const_field(nd=2, s=16, vals=(0.01, -0.02)):
    u = torch.zeros([1, nd] + [s] * nd)
    for i, v in enumerate(vals[:nd]):
        u[:, i] = v
    return u


def test_translation_optimum():
    """Checklist 9: psi = -u, border padding -> L_dist = 0, L_ang = -1; L_reg(const) = 0."""
    u = const_field()
    terms = drdm_loss(-u, u, padding_mode="border")
    assert terms["dist"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["ang"].item() == pytest.approx(-1.0, abs=1e-6)
    assert terms["reg"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(-1.0, abs=1e-6)


def test_distance_and_angle_hand_values():
    u = const_field(vals=(0.01, 0.0))
    p = const_field(vals=(0.0, 0.01))  # orthogonal, same length
    assert angle_loss(p, u).item() == pytest.approx(0.0, abs=1e-6)
    # ||100p + 100u||^2 / (||100u||^2 + 1e-3) = 2 / (1 + 1e-3)
    assert distance_loss(p, u).item() == pytest.approx(2 / (1 + 1e-3), rel=1e-5)
    assert angle_loss(u, u).item() == pytest.approx(1.0, abs=1e-6)


def test_l1_waives_small_differences():
    y = torch.zeros(1, 2, 8, 8)
    y[:, :, :, 4:] = 0.5e-4  # jump below the 1e-4 threshold
    assert regularisation_loss(y).item() == 0.0
    y[:, :, :, 4:] = 3e-4  # 2e-4 above the threshold on one column boundary (of 7) along W
    expected = 0.5 * (2e-4 * 8 / (8 * 7))  # mean over H-diffs is 0; over W-diffs 2e-4 on 1/7 of entries
    assert regularisation_loss(y, detj_weight=0).item() == pytest.approx(expected, rel=1e-3)


def test_official_negdetj_is_not_a_jacobian():
    """Q7: the official term multiplies differences along the same axis; the fix flag adds a true det J."""
    s = 16
    x = torch.arange(s, dtype=torch.float32)
    y = torch.zeros(1, 2, s, s)
    y[:, 1] = (-2.0 * x / s)[None, :, None]  # d u_W / d H = -2: shear, det J = 1 (no fold)
    y[:, 0] = (-2.0 * x / s)[None, None, :]  # d u_H / d W = -2 -> det = 1 - 4 = -3 (folded)
    det = true_jacobian_det(y)
    assert torch.allclose(det, torch.full_like(det, -3.0), atol=1e-5)
    off = official_negdetj(y)
    assert off.abs().max().item() < 1e-6  # blind to this fold: only H-differences enter
    base = regularisation_loss(y)
    fixed = regularisation_loss(y, true_negdetj_weight=1.0)
    assert fixed.item() == pytest.approx(base.item() + 3.0, rel=1e-4)


def test_loss_warp_padding_modes_differ():
    u = const_field(vals=(0.2, 0.0))
    pred = torch.ones(1, 2, 16, 16) * 0.01
    z = recovery_target_warp(pred, u, "zeros")
    b = recovery_target_warp(pred, u, "border")
    assert z[0, 0, -1].abs().max() == 0 and torch.allclose(b, pred)


@torch.no_grad()
def test_official_weights_losses(official_net, source_image):
    """Checklist 10: mean over t in {20,40,60,79} x 3 seeds: L_ang <= -0.8 and L_dist <= 0.6."""
    diff = DeformationDiffusion(ndims=2, img_size=256)  # training settings (bilinear, border C-grid)
    angs, dists = [], []
    for t in (20, 40, 60, 79):
        for seed in range(3):
            torch.manual_seed(seed)
            x_t, u_lab, _ = diff(source_image, torch.tensor([t]))
            terms = drdm_loss(official_net(x_t, torch.tensor([t]), rec_num=2), u_lab, "zeros")
            angs.append(terms["ang"].item())
            dists.append(terms["dist"].item())
    assert sum(angs) / len(angs) <= -0.8
    assert sum(dists) / len(dists) <= 0.6


def test_dist_eps_flag_both_behaviours():
    """train.dist_eps: official 1e-3 (x100 units) makes a t=0 sample (U = 0) cost 1e7 |p'|^2; eps=1 costs 1e4."""
    from drdm.losses import distance_loss

    p = torch.full((1, 2, 4, 4), 1e-3)
    zero = torch.zeros_like(p)
    official = distance_loss(p, zero)
    assert official.item() == pytest.approx(1e7 * 2 * 1e-6, rel=1e-5)
    assert distance_loss(p, zero, eps=1.0).item() == pytest.approx(1e4 * 2 * 1e-6, rel=1e-5)
    u = torch.full_like(p, 0.2)  # large targets: eps hardly matters, the loss stays a relative error
    assert distance_loss(-u, u, 1.0).item() == 0.0
    assert distance_loss(zero, u, 1.0).item() == pytest.approx(distance_loss(zero, u).item(), rel=3e-3)

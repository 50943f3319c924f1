"""Checklist E (inverse optimisation) with the micro prior and the model-free identity prior."""

import numpy as np
import pytest
import torch

from medsynth_core.io import MedicalImage, read_image, write_image
from mgdcr.config import InverseConfig
from mgdcr.demo import phantom_case
from mgdcr.diffusion import GaussianDiffusion
from mgdcr.geometry import dhw_to_ijk_affine
from mgdcr.infer import DiffAEPrior, IdentityPrior, output_affine, reconstruct
from mgdcr.losses import lax_volume_loss, smoothness_loss
from mgdcr.model import DiffAE, preset


@pytest.fixture(scope="module")
def case16():
    return phantom_case(n_slices=3, K=4, size=16, seed=0)


def _micro_prior(flip_h=False):
    torch.manual_seed(0)
    m = DiffAE(preset("micro"))
    for p in m.parameters():  # an untrained but non-trivial network
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    return DiffAEPrior(m, GaussianDiffusion(), 5, 5, flip_h=flip_h)


def test_e1_no_data_terms_returns_decoded_seeds(case16):
    ic = InverseConfig(K=4, encode_steps=5, decode_steps=5, iterations=3, lambda_lax=0.0, lambda_smooth=0.0)
    res = reconstruct(_micro_prior(), case16["sax"], case16["sax_affine"], case16["planes"], ic)
    assert res.iterations == 3
    np.testing.assert_array_equal(res.volume, res.seeds)
    assert res.volume.shape == (9, 16, 16)


def test_e1b_data_terms_change_the_result_and_lax_loss_decreases(case16):
    ic = InverseConfig(K=4, encode_steps=5, decode_steps=5, iterations=3, lr=2e-2)
    res = reconstruct(_micro_prior(), case16["sax"], case16["sax_affine"], case16["planes"], ic)
    assert not np.array_equal(res.volume, res.seeds)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_e2_identity_decoder_fits_lax(case16):
    ic = InverseConfig(
        K=4,
        iterations=200,
        lambda_lat=0.0,
        lambda_smooth=0.0,
        pullback=0.0,
        lr=1e-2,
        lr_step=10_000,
        harmonise=False,
        early_stop_patience=10_000,
    )
    res = reconstruct(IdentityPrior(), case16["sax"], case16["sax_affine"], case16["planes"], ic)
    g, m = res.targets
    assert m.sum() > 20
    resid = ((m * res.volume - m * g) ** 2).sum() / m.sum()
    assert resid < 1e-3
    assert res.history[-1]["lax"] < 1e-3 * res.history[0]["lax"]


def test_plane_space_mode_runs_and_reduces_lax(case16):
    ic = InverseConfig(
        K=4,
        iterations=30,
        lambda_lat=0.0,
        lambda_smooth=0.0,
        pullback=0.0,
        lr=1e-2,
        lax_space="plane",
        early_stop_patience=10_000,
    )
    res = reconstruct(IdentityPrior(), case16["sax"], case16["sax_affine"], case16["planes"], ic)
    assert res.history[-1]["lax"] < 0.5 * res.history[0]["lax"]


def test_e5_empty_mask_finite_and_fork_nan():
    x = torch.rand(3, 4, 4, requires_grad=True)
    g = torch.rand(3, 4, 4)
    m = torch.zeros(3, 4, 4)
    m[1, :2] = 1
    loss = lax_volume_loss(x, g, m)
    assert torch.isfinite(loss).all() and loss[0] == 0
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.isnan(lax_volume_loss(x.detach(), g, m, eps=0.0)[0])  # fork behaviour (mask_eps=0)
    # mask_target=False (fork) only adds the constant Σ G² outside M
    a = lax_volume_loss(x.detach(), g, m, mask_target=False)[1]
    b = lax_volume_loss(x.detach(), g, m, mask_target=True)[1]
    torch.testing.assert_close(a - b, ((g[1] * (1 - m[1])) ** 2).sum() / (m[1].sum() + 1e-8))


def test_e5_mismatched_targets_raise(case16):
    ic = InverseConfig(K=4, iterations=1)
    bad = (np.zeros((5, 16, 16)), np.zeros((5, 16, 16)))
    with pytest.raises(ValueError, match="dense grid"):
        reconstruct(IdentityPrior(), case16["sax"], case16["sax_affine"], [], ic, targets=bad)


def test_smoothness_counts_each_pair_twice_with_replicate_padding():
    x = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1)
    np.testing.assert_allclose(smoothness_loss(x).numpy(), [0 + 1, 1 + 4, 4 + 0])


def test_e6_output_geometry_and_h_flip(tmp_path, case16):
    aff = case16["sax_affine"]
    K, n = 4, 3
    out = output_affine(aff, list(range(n)), n, K)
    np.testing.assert_allclose(np.linalg.norm(out[:3, 0]), np.linalg.norm(aff[:3, 0]) / K, rtol=1e-12)
    vol = np.random.default_rng(0).random((K * (n - 1) + 1, 16, 16)).astype(np.float32)
    path = write_image(MedicalImage.from_dhw(vol, dhw_to_ijk_affine(out)), tmp_path / "v.nii.gz")
    img = read_image(path)
    np.testing.assert_allclose(img.to_dhw(), vol)
    for m in range(n):
        world_dense = img.affine @ np.array([3.0, 5.0, m * K, 1.0])  # (i, j, k) = (w, h, d)
        world_sax = aff @ np.array([m, 5.0, 3.0, 1.0])
        assert np.abs(world_dense - world_sax).max() < 1e-4
    np.testing.assert_allclose(img.spacing[2], np.linalg.norm(aff[:3, 0]) / K, rtol=1e-6)
    # kept-slice fix vs fork geometry (empty first slice dropped; 4 original slices)
    fixed = output_affine(aff, [1, 2, 3], 4, K)
    np.testing.assert_allclose(fixed[:3, 3], aff[:3, 3] + aff[:3, 0])
    fork = output_affine(aff, [1, 2, 3], 4, K, from_kept=False)
    np.testing.assert_allclose(fork[:3, 3], aff[:3, 3])
    np.testing.assert_allclose(np.linalg.norm(fork[:3, 0]), np.linalg.norm(aff[:3, 0]) * 3 / 8)
    # the H flip is internal to the prior and round-trips
    p = _micro_prior(flip_h=True)
    x = torch.rand(2, 16, 16)
    torch.testing.assert_close(p.from_net(p.to_net(x)), x)
    assert torch.equal(p.to_net(x)[:, 0], (x * 2 - 1).flip(-2))


def test_harmonise_moment_match_and_flag(case16):
    from mgdcr.infer import harmonise

    rng = np.random.default_rng(0)
    g = rng.random((5, 4, 4)) * 3 + 2
    s = rng.random((5, 4, 4))
    m = np.zeros_like(g)
    m[1:3] = 1
    h = harmonise(g, m, s)
    r = m > 0
    assert abs(h[r].mean() - s[r].mean()) < 1e-12 and abs(h[r].std() - s[r].std()) < 1e-12
    np.testing.assert_array_equal(h[~r], g[~r])
    on = reconstruct(
        IdentityPrior(),
        case16["sax"],
        case16["sax_affine"],
        case16["planes"],
        InverseConfig(K=4, iterations=0, harmonise=True),
    )
    off = reconstruct(
        IdentityPrior(),
        case16["sax"],
        case16["sax_affine"],
        case16["planes"],
        InverseConfig(K=4, iterations=0, harmonise=False),
    )
    assert not np.allclose(on.targets[0], off.targets[0])
    np.testing.assert_array_equal(on.targets[1], off.targets[1])


def test_optional_sax_fidelity_term(case16):
    base = dict(
        K=4,
        iterations=20,
        lambda_lat=0.0,
        lambda_smooth=0.0,
        pullback=0.0,
        lr=1e-2,
        harmonise=False,
        early_stop_patience=10_000,
    )
    off = reconstruct(
        IdentityPrior(), case16["sax"], case16["sax_affine"], case16["planes"], InverseConfig(**base)
    )
    on = reconstruct(
        IdentityPrior(),
        case16["sax"],
        case16["sax_affine"],
        case16["planes"],
        InverseConfig(**base, lambda_sax=100.0),
    )
    err = [np.abs(r.volume[::4] - case16["sax"]).mean() for r in (off, on)]
    assert err[1] < err[0]


def test_freeze_ends_keeps_end_slices(case16):
    ic = InverseConfig(K=4, iterations=5, lr=5e-2, freeze_ends=True, early_stop_patience=10_000)
    res = reconstruct(IdentityPrior(), case16["sax"], case16["sax_affine"], case16["planes"], ic)
    np.testing.assert_allclose(res.volume[[0, -1]], res.seeds[[0, -1]], atol=1e-6)
    assert not np.allclose(res.volume[1:-1], res.seeds[1:-1])


def test_n4_removes_a_smooth_bias_field():
    from mgdcr.infer import n4_correct

    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    truth = np.full((32, 32), 0.2)
    truth[8:24, 8:24] = 1.0
    bias = 1.0 + 0.6 * xx
    for arr in (truth * bias, (truth * bias)[None], np.stack([truth * bias] * 3)):
        out = n4_correct(arr)
        assert out.shape == arr.shape and np.isfinite(out).all()
        sl = out.reshape(-1, 32, 32)[0]
        inner = sl[10:22, 10:22]
        # the left/right intensity ratio inside the bright square moves towards 1 (it is 1.3 before)
        before = (truth * bias)[10:22, 18:22].mean() / (truth * bias)[10:22, 10:14].mean()
        after = inner[:, 8:].mean() / inner[:, :4].mean()
        assert abs(after - 1) < abs(before - 1)


class _LossyPrior(IdentityPrior):
    """Identity latent, but the decoder loses 10 % of the intensity: the round trip of a SAX slice is not
    the slice, so frozen slices show whether they hold the decoded seed or the measured image."""

    def decode(self, xt, z, grad=False):
        return 0.9 * super().decode(xt, z, grad)


def test_freeze_acquired_keeps_every_acquired_slice_at_its_encoding(case16):
    """Extension ``inverse.freeze_acquired``: the acquired slices stay at their decoded seeds and only the
    K−1 slices of every gap are optimised; off (ex8), the acquired slices move too."""
    base = dict(K=4, iterations=5, lr=5e-2, early_stop_patience=10_000, harmonise=False)
    args = (case16["sax"], case16["sax_affine"], case16["planes"])
    on = reconstruct(_LossyPrior(), *args, InverseConfig(**base, freeze_acquired=True))
    off = reconstruct(_LossyPrior(), *args, InverseConfig(**base))
    acq, held = [0, 4, 8], [1, 2, 3, 5, 6, 7]
    np.testing.assert_allclose(on.seeds[acq], 0.9 * case16["sax"], atol=1e-6)
    np.testing.assert_array_equal(on.volume[acq], on.seeds[acq])
    assert np.abs(on.volume[held] - on.seeds[held]).max() > 1e-3
    assert np.abs(off.volume[acq] - off.seeds[acq]).max() > 1e-3
    assert on.iterations == off.iterations == 5
    # the free slices see the same losses, but with fixed neighbours: the results differ
    assert not np.allclose(on.volume[held], off.volume[held])


def test_linear_baseline_is_torch_linear_interpolation_on_the_dense_grid(case16):
    """z-linear is ``F.interpolate(mode='linear', align_corners=True)`` along z: the dense grid's end slices
    are the acquired end slices (dense slice mK = acquired slice m)."""
    import torch.nn.functional as F

    from mgdcr.infer import linear_interp_z

    sax = torch.as_tensor(case16["sax"])  # (n, H, W)
    ref = F.interpolate(sax.permute(1, 2, 0), size=9, mode="linear", align_corners=True).permute(2, 0, 1)
    np.testing.assert_allclose(linear_interp_z(case16["sax"], 4), ref.numpy(), atol=1e-12)

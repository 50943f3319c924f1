"""ControlNet (spec §4; checklist item 12) and the degraded-input simulators."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from meddiffusion3d.biflownet import BiFlowNet, resolution_code
from meddiffusion3d.controlnet import ControlledBiFlowNet, ControlNet, image_hint, make_hint
from meddiffusion3d.degrade import (
    ParallelBeamProjector,
    degrade,
    fbp,
    kspace_undersample,
    sparse_view_ct,
    thick_slice,
)
from meddiffusion3d.diffusion import GaussianDiffusion

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import BIFLOW_DEMO as DEMO  # noqa: E402
from md3d_testutils import BIFLOW_PAPER_STRUCTURE as PAPER_STRUCTURE


def _perturbed(kw, seed=0):
    torch.manual_seed(seed)
    net = BiFlowNet(**kw)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # non-zero FinalLayers: DiT path active
    return net


def _batch(shape, channels, b=2):
    x = torch.randn(b, channels, *shape)
    return x, torch.tensor([3, 700])[:b], torch.tensor([0, 1])[:b], resolution_code(shape, b)


# ----------------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize("variant,hint_ch", [("v1", 4), ("v2", 1)])
def test_output_equals_base_exactly_at_init(variant, hint_ch):
    base = _perturbed(DEMO)
    model = ControlledBiFlowNet(base, variant=variant, hint_channels=hint_ch).train()
    x, t, y, res = _batch((8, 8, 16), 4)
    hint = torch.randn(2, hint_ch, 8, 8, 16)
    with torch.no_grad():
        out = model(x, t, y=y, res=res, hint=hint)
        ref = base(x, t, y=y, res=res)
    assert torch.equal(out, ref)
    assert not base.training  # frozen base stays in eval mode


def test_six_controls_with_spec_shapes():
    base = _perturbed(PAPER_STRUCTURE)
    cn = ControlNet.from_base(base)
    x, t, y, res = _batch((16, 16, 24), 8, b=1)
    with torch.no_grad():
        controls = cn(x, t, torch.randn_like(x), y=y, res=res)
    d = 12
    expect = [
        (d, 16, 16, 24),
        (d, 16, 16, 24),
        (2 * d, 8, 8, 12),
        (4 * d, 4, 4, 6),
        (8 * d, 2, 2, 3),
        (8 * d, 2, 2, 3),
    ]
    assert [tuple(c.shape[1:]) for c in controls] == expect
    assert all(torch.count_nonzero(c) == 0 for c in controls)


def test_controlnet_parameter_counts_paper():
    with torch.device("meta"):
        base = BiFlowNet()
        v1 = ControlNet(base.config, 8, "v1")
        v2 = ControlNet(base.config, 1, "v2")
    assert sum(p.numel() for p in v1.parameters()) == 93_501_720  # spec §4: 93.5 M
    assert sum(p.numel() for p in v2.parameters()) == 92_649_096  # spec §4: 92.6 M


def test_shared_keys_equal_base_and_hint_slices_zero():
    base = _perturbed(DEMO)
    cn = ControlNet.from_base(base, hint_channels=4)
    bsd, csd = base.state_dict(), cn.state_dict()
    shared = set(bsd) & set(csd)
    assert len(shared) > 100
    assert not any(k.startswith(("ups.", "head_", "dit_out", "dit_mid")) for k in csd)
    for k in shared:
        if k in ("stem.weight", "patch_embed.weight"):
            assert torch.equal(csd[k][:, :4], bsd[k])
            assert torch.count_nonzero(csd[k][:, 4:]) == 0
        else:
            assert torch.equal(csd[k], bsd[k]), k


def test_training_step_freezes_base_and_reaches_zero_convs():
    base = _perturbed(DEMO)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = ControlledBiFlowNet(base, hint_channels=4).train()
    params = model.trainable_parameters()
    assert not any(p.requires_grad for p in base.parameters())
    assert {id(p) for p in params} == {id(p) for p in model.controlnet.parameters() if p.requires_grad}
    opt = torch.optim.Adam(params, lr=1e-3)
    d = GaussianDiffusion(100)
    x0 = torch.rand(2, 4, 8, 8, 8) * 2 - 1
    hint = torch.randn_like(x0)
    loss = d.training_loss(
        model,
        x0,
        y=torch.tensor([0, 1]),
        res=resolution_code((8, 8, 8), 2),
        hint=hint,
        generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    zc = [*model.controlnet.zero_convs, model.controlnet.mid_zero_conv]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in zc)
    assert all(p.grad is None for p in base.parameters())
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert any(c.weight.abs().sum() > 0 for c in zc)
    with torch.no_grad():  # after the step the control changes the output
        x, t, y, res = _batch((8, 8, 8), 4)
        assert (model(x, t, y=y, res=res, hint=hint) - base(x, t, y=y, res=res)).abs().max() > 0


def test_hint_validation_and_sampling_with_hint():
    base = _perturbed(DEMO)
    model = ControlledBiFlowNet(base, hint_channels=4).eval()
    x, t, y, res = _batch((8, 8, 8), 4, b=1)
    with pytest.raises(ValueError, match="hint"):
        model(x, t, y=y, res=res)
    with pytest.raises(ValueError, match="latent grid"):
        model(x, t, y=y, res=res, hint=torch.randn(1, 4, 4, 8, 8))
    with pytest.raises(ValueError, match="control_scales"):
        ControlledBiFlowNet(base, control_scales=[1.0, 1.0])
    out = GaussianDiffusion(10).sample(
        model, torch.randn_like(x), "ddim", steps=3, y=y, res=res, hint=torch.randn_like(x)
    )
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_image_hint_nearest():
    img = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 1, 4, 4, 4)
    h = image_hint(img, (2, 2, 2))
    assert h.shape == (1, 1, 2, 2, 2)
    assert h[0, 0, 1, 1, 1] == img[0, 0, 2, 2, 2]


# ----------------------------------------------------------------------------------------------- degrade
def test_thick_slice_averages_groups():
    vol = torch.arange(8, dtype=torch.float32).reshape(1, 1, 8, 1, 1).expand(1, 1, 8, 2, 2).contiguous()
    out = thick_slice(vol, 4, mode="nearest")
    assert torch.equal(out[0, 0, :, 0, 0], torch.tensor([1.5] * 4 + [5.5] * 4))
    assert thick_slice(vol, 2).shape == vol.shape
    with pytest.raises(ValueError, match="multiple"):
        thick_slice(vol, 3)


def _disc_phantom(n=32):
    yy, xx = torch.meshgrid(torch.arange(n) - n / 2 + 0.5, torch.arange(n) - n / 2 + 0.5, indexing="ij")
    mu = ((xx**2 + yy**2) < 100).float() * 0.8 + (((xx - 3) ** 2 + (yy + 2) ** 2) < 9).float() * 0.2
    return mu


def test_projector_conserves_mass():
    mu = _disc_phantom()
    proj = ParallelBeamProjector(torch.linspace(0, math.pi, 7)[:-1], 32)
    sino = proj(mu[None])
    assert sino.shape == (1, 6, 32)
    torch.testing.assert_close(sino.sum(-1), mu.sum().expand(1, 6), rtol=1e-2, atol=0)
    # angle 0 integrates along rows (H)
    torch.testing.assert_close(proj(mu[None])[0, 0], mu.sum(0), rtol=1e-5, atol=1e-4)


def test_fbp_full_scan_recovers_and_sparse_view_degrades():
    mu = _disc_phantom()
    vol = (mu * 2 - 1)[None, None, None]
    full = sparse_view_ct(vol, n_views=180, clamp=False)
    sparse = sparse_view_ct(vol, n_views=12, clamp=False)
    limited = degrade(vol, "limited_angle_ct", arc_degrees=90.0, n_views=90)
    err = lambda r: (r - vol)[..., 8:24, 8:24].abs().mean().item()  # noqa: E731
    assert err(full) < 0.08
    assert err(sparse) > err(full) and err(limited) > err(full)
    proj = ParallelBeamProjector(torch.arange(180) * math.pi / 180, 32)
    rec = fbp(proj(mu[None]), proj)[0]
    assert (rec - mu)[8:24, 8:24].abs().mean() < 0.04
    # non-square slices are padded to square and cropped back
    assert sparse_view_ct(torch.zeros(1, 1, 2, 16, 24), n_views=8).shape == (1, 1, 2, 16, 24)


def test_kspace_identity_without_undersampling_and_degrades_with():
    vol = torch.rand(1, 1, 2, 16, 16) * 2 - 1
    torch.testing.assert_close(kspace_undersample(vol, acceleration=1), vol, rtol=1e-5, atol=1e-5)
    out = kspace_undersample(vol, acceleration=4, seed=1)
    assert out.shape == vol.shape and (out - vol).abs().mean() > 0.05
    assert torch.equal(out, kspace_undersample(vol, acceleration=4, seed=1))


def test_degrade_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(torch.zeros(1, 1, 4, 4, 4), "blur")
    with pytest.raises(ValueError, match="NaN"):
        degrade(torch.full((1, 1, 4, 4, 4), float("nan")), "thick_slice", factor=2)
    with pytest.raises(ValueError, match=r"\(B, C, D, H, W\)"):
        degrade(torch.zeros(4, 4, 4), "kspace")


def test_make_hint_variants():
    img = torch.rand(1, 1, 16, 16, 16)
    assert make_hint(img, "v2", (4, 4, 4)).shape == (1, 1, 4, 4, 4)

    def enc(v):  # stand-in for the frozen autoencoder's normalised patch encoding (4× down, 4 channels)
        return torch.nn.functional.avg_pool3d(v, 4).repeat(1, 4, 1, 1, 1)

    h = make_hint(img, "v1", (4, 4, 4), enc)
    torch.testing.assert_close(h, enc(img))
    with pytest.raises(ValueError, match="encode_fn"):
        make_hint(img, "v1", (4, 4, 4))
    with pytest.raises(ValueError, match="latent grid"):
        make_hint(img, "v1", (8, 8, 8), enc)

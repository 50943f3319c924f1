import pytest
import torch
import torch.nn.functional as F

from drdm.deform import DeformationDiffusion, compose, step_counts, warp
from drdm.evaluate import field_stats, forward_level_stats
from medsynth_core.metrics import negative_jacobian_fraction


def smooth_field(nd, s, amp, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn([1, nd] + [4] * nd, generator=g) * amp
    return F.interpolate(coarse, [s] * nd, mode="bilinear" if nd == 2 else "trilinear", align_corners=True)


@pytest.mark.parametrize("s,tol", [(256, 1e-5), (33, 0.0)])
def test_identity_warp(s, tol):
    img = torch.rand(2, 1, s, s)
    out = warp(img, torch.zeros(2, 2, s, s))
    assert (out - img).abs().max().item() <= tol


def test_zero_composition_and_translation_units():
    u = smooth_field(2, 32, 0.01)
    torch.testing.assert_close(compose(u, torch.zeros_like(u)), u, atol=1e-7, rtol=0)
    # unit convention: u = 2/S along W moves content by 2 voxels: W(I,u)(x) = I(x + 2)
    img = torch.arange(32.0).repeat(32, 1)[None, None]
    u = torch.zeros(1, 2, 32, 32)
    u[:, 1] = 2 / 32
    out = warp(img, u)
    assert torch.allclose(out[0, 0, :, :30], img[0, 0, :, 2:], atol=1e-4)
    u = torch.zeros(1, 2, 32, 32)
    u[:, 0] = 3 / 32  # channel 0 = displacement along H
    assert torch.allclose(warp(img.transpose(2, 3), u)[0, 0, :29], img.transpose(2, 3)[0, 0, 3:], atol=1e-4)


@pytest.mark.parametrize("nd", [2, 3])
def test_composition_matches_sequential_warps(nd):
    s = 32 if nd == 2 else 16
    u, v = smooth_field(nd, s, 0.01, 1), smooth_field(nd, s, 0.01, 2)
    coords = torch.meshgrid([torch.arange(float(s))] * nd, indexing="ij")
    img = sum(torch.sin(c / (8.0 + 2 * i)) for i, c in enumerate(coords))[None, None] / nd
    lhs = warp(warp(img, u), v)
    rhs = warp(img, compose(u, v))
    interior = (slice(None), slice(None)) + (slice(4, -4),) * nd
    assert (lhs - rhs)[interior].abs().mean().item() < 1e-3


def test_batch_vectorised():
    u = torch.stack([smooth_field(2, 16, 0.02, i)[0] for i in range(3)])
    img = torch.rand(3, 1, 16, 16)
    out = warp(img, u)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], warp(img[i : i + 1], u[i : i + 1]))


def test_schedule_table():
    t = torch.tensor([0, 1, 5, 10, 20, 40, 48, 64, 79, 80])
    n_img, n_lab = step_counts(t)
    assert n_img.tolist() == [1, 1, 5, 13, 32, 80, 102, 148, 195, 198]
    assert n_lab.tolist() == [0, 1, 2, 3, 6, 9, 10, 12, 13, 13]


@pytest.mark.parametrize(
    "s,ref",
    [
        (64, (8.004539, 1.434181e-2, 0.617247, 1.682641e-3, 2006.5493)),
        (256, (512.289551, 5.746680e-2, 39.503773, 6.745338e-3, 29217.0078)),
    ],
)
def test_forward_parity_fingerprint(s, ref):
    """Checklist 4: official RNG order, torch.manual_seed(0) right before the call."""
    diff = DeformationDiffusion(ndims=2, img_size=s, v_scale=4e-5)
    x0 = torch.linspace(0, 1, s * s).reshape(1, 1, s, s)
    torch.manual_seed(0)
    x_t, u_lab, u_img = diff(x0, torch.tensor([40]))
    got = (
        u_img.sum().item(),
        u_img.abs().mean().item(),
        u_lab.sum().item(),
        u_lab.abs().mean().item(),
        x_t.sum().item(),
    )
    assert got == pytest.approx(ref, rel=1e-4)


def test_t0_shapes_and_label_zero():
    diff = DeformationDiffusion(ndims=2, img_size=32, ctl_sz=16, v_scale=2e-4)
    x_t, u_lab, u_img = diff(torch.rand(3, 1, 32, 32), torch.tensor([0, 0, 5]))
    assert u_lab.shape == u_img.shape == (3, 2, 32, 32) and x_t.shape == (3, 1, 32, 32)
    assert torch.count_nonzero(u_lab[:2]) == 0 and u_img[:2].abs().max() > 0
    assert u_lab[2].abs().max() > 0
    diff3 = DeformationDiffusion(ndims=3, img_size=16, ctl_sz=16, v_scale=4e-4)
    x_t, u_lab, u_img = diff3(torch.rand(1, 1, 16, 16, 16), torch.tensor([10]))
    assert u_img.shape == (1, 3, 16, 16, 16)


def test_rng_order_uses_default_generator():
    diff = DeformationDiffusion(ndims=2, img_size=64)
    torch.manual_seed(3)
    a = diff.sample_fields(torch.tensor([10]))
    g = torch.Generator().manual_seed(3)
    b = diff.sample_fields(torch.tensor([10]), generator=g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("s", [64, 128])
def test_topology_2d(s):
    """Checklist 6 (2D, S <= 2C): U_lab never folds, U_img < 1 %."""
    diff = DeformationDiffusion(ndims=2, img_size=s)
    for t in (1, 10, 40, 64, 79):
        u_img, u_lab = diff.sample_fields(torch.tensor([t]), generator=torch.Generator().manual_seed(t))
        assert negative_jacobian_fraction(u_lab * s).item() == 0.0
        assert negative_jacobian_fraction(u_img * s).item() < 0.01


@pytest.mark.slow
def test_topology_3d():
    diff = DeformationDiffusion(ndims=3, img_size=64)
    for t in (40,):
        u_img, u_lab = diff.sample_fields(torch.tensor([t]), generator=torch.Generator().manual_seed(t))
        assert negative_jacobian_fraction(u_lab * 64).item() == 0.0
        assert negative_jacobian_fraction(u_img * 64).item() < 0.01


def test_geometric_lift_flag_at_256():
    """Q1: faithful S/C lift folds the CMR-size forward field; geometric_lift=True does not."""
    faithful = DeformationDiffusion(ndims=2, img_size=256)
    fixed = DeformationDiffusion(ndims=2, img_size=256, geometric_lift=True)
    g = torch.Generator().manual_seed(0)
    u_f, _ = faithful.sample_fields(torch.tensor([64]), generator=g)
    g = torch.Generator().manual_seed(0)
    u_g, _ = fixed.sample_fields(torch.tensor([64]), generator=g)
    torch.testing.assert_close(u_f, 2 * u_g, rtol=1e-5, atol=1e-7)  # S/C = 4 vs crop_rate = 2
    assert negative_jacobian_fraction(u_f * 256).item() > 0.05
    assert negative_jacobian_fraction(u_g * 256).item() < 0.01


def test_magnitude_rises_with_t():
    """Checklist 7 (8 seeds at S=64; S=128, t=79: max > 10 % of S)."""
    rows = forward_level_stats(DeformationDiffusion(ndims=2, img_size=64), [10, 40, 64, 79], seeds=range(8))
    means = [r["img_mag_mean"] for r in rows]
    assert means == sorted(means) and means[0] < means[-1]
    u_img, _ = DeformationDiffusion(ndims=2, img_size=128).sample_fields(
        torch.tensor([79]), generator=torch.Generator().manual_seed(0)
    )
    assert field_stats(u_img)["mag_max_pct"] > 10.0


def test_bad_sizes():
    with pytest.raises(ValueError, match="img_size"):
        DeformationDiffusion(ndims=2, img_size=32, ctl_sz=16)(torch.rand(1, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="bicubic"):
        warp(torch.rand(1, 1, 8, 8, 8), torch.zeros(1, 3, 8, 8, 8), mode="bicubic")


@pytest.mark.parametrize("nd", [2, 3])
def test_fused_chains_and_cached_grid_are_bit_identical(nd):
    """Issue 19: the sampler composes the image and label chains as one batch of 2B and ``warp`` reuses its
    reference grid; both must give exactly the two-call loop of the official code with a fresh grid."""
    from drdm import deform

    d = DeformationDiffusion(ndims=nd, img_size=16, ctl_sz=16, v_scale=4e-3)
    t = torch.tensor([3, 17, 40])
    got = d.sample_fields(t, generator=torch.Generator().manual_seed(5))

    def fresh_compose(u, v):  # the official per-call grid: arange, meshgrid, scale, half built every time
        shape = tuple(v.shape[2:])
        ref = torch.stack(torch.meshgrid([torch.arange(s) for s in shape], indexing="ij"), 0)[None]
        scale = torch.full([1, nd] + [1] * nd, float(shape[0]))
        half = torch.tensor([(s - 1) / 2.0 for s in shape]).reshape([1] + [1] * nd + [nd])
        grid = torch.flip(((v * scale + ref).permute([0, *range(2, 2 + nd), 1])) / half - 1, dims=[-1])
        return v + F.grid_sample(u, grid, mode="bilinear", padding_mode="border", align_corners=True)

    g = torch.Generator().manual_seed(5)
    n_img, n_lab = step_counts(t)
    n_img, n_lab = (n.reshape([3] + [1] * (nd + 1)) for n in (n_img, n_lab))
    v = d.velocity(3, d.v_scale, g)
    v_img = fresh_compose(d.velocity(3, d.v_scale * d.noise_ratio, g), v)
    psi_img = psi_lab = torch.zeros([3, nd] + [16] * nd)
    for j in range(int(n_img.max())):
        psi_img = fresh_compose(psi_img, v_img * (n_img > j).int())
        psi_lab = fresh_compose(psi_lab, v * (n_lab > j).int())
    assert torch.equal(got[0], d.lift(psi_img)) and torch.equal(got[1], d.lift(psi_lab))
    assert float(got[0].abs().max()) > 0  # a real deformation, not two zero fields
    assert deform._grid_constants.cache_info().hits > 0

"""Checklist D (geometry / forward operator)."""

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from mgdcr.geometry import DenseGrid, LaxPlane, plane_adjoint, plane_to_grid, plane_voxel_coords, sample_plane


def _grid_affine(seed=0, spacing=(4.0, 1.5, 1.2)):
    rot = Rotation.random(random_state=seed).as_matrix()
    a = np.eye(4)
    a[:3, :3] = rot * np.asarray(spacing)
    a[:3, 3] = [5.0, -3.0, 12.0]
    return a


def _oblique_plane(grid_affine, shape, seed=0, px=1.3, size=(20, 22)):
    rng = np.random.default_rng(seed)
    rot = Rotation.random(random_state=seed + 100).as_matrix()
    centre = grid_affine[:3, :3] @ ((np.asarray(shape) - 1) / 2 + rng.normal(0, 0.5, 3)) + grid_affine[:3, 3]
    a = np.eye(4)
    a[:3, :3] = rot * px
    a[:3, 3] = centre - a[:3, 0] * (size[0] - 1) / 2 - a[:3, 1] * (size[1] - 1) / 2
    return a, size


def test_d1_adjoint_and_gradcheck():
    shape = (7, 9, 8)
    for seed in range(3):
        ga = _grid_affine(seed)
        pa, size = _oblique_plane(ga, shape, seed)
        gen = torch.Generator().manual_seed(seed)
        v = torch.randn(shape, dtype=torch.float64, generator=gen)
        y = torch.randn(size, dtype=torch.float64, generator=gen)
        av, mask = sample_plane(v, ga, pa, size)
        assert 0 < mask.sum() < mask.numel()  # partly outside the FOV: masking is exercised
        aty = plane_adjoint(y, ga, pa, shape)
        lhs, rhs = (av * y).sum(), (v * aty).sum()
        assert abs(lhs - rhs) <= 1e-6 * av.norm() * y.norm()
        # autograd's vector-Jacobian product equals the explicit splat
        vv = v.clone().requires_grad_(True)
        (sample_plane(vv, ga, pa, size)[0] * y).sum().backward()
        torch.testing.assert_close(vv.grad, aty, rtol=1e-10, atol=1e-12)
    small = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    ga = _grid_affine(5, (2.0, 1.0, 1.0))
    pa, size = _oblique_plane(ga, (3, 4, 4), 5, px=0.9, size=(5, 6))
    assert torch.autograd.gradcheck(lambda x: sample_plane(x, ga, pa, size)[0], (small,))


def test_d2_plane_on_dense_slice_returns_slice():
    grid = DenseGrid(_grid_affine(1), n_slices=3, K=4, hw=(10, 12))
    v = torch.randn(grid.shape, dtype=torch.float64)
    for k in (0, 3, grid.D - 1):
        pa = grid.affine.copy()
        pa[:3, :3] = grid.affine[:3, [1, 2, 0]]  # rows = h, cols = w, normal = d
        pa[:3, 3] = grid.affine[:3, :3] @ [k, 0, 0] + grid.affine[:3, 3]
        vals, mask = sample_plane(v, grid.affine, pa, (10, 12))
        assert bool(mask.all())
        assert (vals - v[k]).abs().max() < 1e-6


def test_d3_linear_functions_reproduced():
    for seed, spacing in ((0, (4.0, 1.5, 1.2)), (1, (10.0, 1.8, 1.8))):
        ga = _grid_affine(seed, spacing)
        shape = (6, 11, 9)
        a_vec, b = np.array([0.3, -1.2, 0.7]), 2.5
        idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
        world = idx @ ga[:3, :3].T + ga[:3, 3]
        v = torch.from_numpy(world @ a_vec + b)
        pa, size = _oblique_plane(ga, shape, seed)
        vals, mask = sample_plane(v, ga, pa, size)
        r, c = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
        pw = np.stack([r, c, np.zeros_like(r)], -1) @ pa[:3, :3].T + pa[:3, 3]
        expect = pw @ a_vec + b
        m = mask.numpy()
        assert m.sum() > 20
        assert np.abs(vals.numpy()[m] - expect[m]).max() < 1e-5


def test_d4_matches_scipy_map_coordinates():
    ga = _grid_affine(2)
    shape = (7, 9, 8)
    pa, size = _oblique_plane(ga, shape, 2)
    v = np.random.default_rng(0).normal(size=shape)
    vals, mask = sample_plane(torch.from_numpy(v), ga, pa, size)
    coords = plane_voxel_coords(ga, pa, size)
    ref = map_coordinates(v, coords.reshape(-1, 3).T, order=1, mode="constant", cval=0.0).reshape(size)
    m = mask.numpy()
    assert np.abs(vals.numpy()[m] - ref[m]).max() < 1e-5
    assert np.all(vals.numpy()[~m] == 0)


def test_d5_plane_to_grid_axis_aligned_and_axis_permutation():
    ga = _grid_affine(3, (3.0, 1.5, 1.2))
    shape = (6, 10, 8)
    h0 = 4
    pa = np.eye(4)
    pa[:3, :3] = ga[:3, [0, 2, 1]]  # rows along d, columns along w, normal along h
    pa[:3, 3] = ga[:3, :3] @ [0, h0, 0] + ga[:3, 3]
    img = np.random.default_rng(1).random((6, 8))
    g, m = plane_to_grid([LaxPlane(img, pa, "test")], ga, shape, half_thickness=0.49 * 1.5)
    np.testing.assert_allclose(g[:, h0, :], img, atol=1e-12)
    assert m[:, h0, :].all() and m.sum() == img.size
    # permuting/flipping the volume axes, with the affine changed to match, leaves world results unchanged
    v = torch.randn(shape, dtype=torch.float64)
    pb, size = _oblique_plane(ga, shape, 3)
    ref, ref_m = sample_plane(v, ga, pb, size)
    perm = (2, 0, 1)
    vp = v.permute(perm).flip(0)
    ap = np.eye(4)
    ap[:3, :3] = ga[:3, list(perm)]
    ap[:3, 3] = ga[:3, 3] + ga[:3, perm[0]] * (shape[perm[0]] - 1)
    ap[:3, 0] = -ap[:3, 0]
    out, out_m = sample_plane(vp, ap, pb, size)
    assert torch.equal(out_m, ref_m)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    gp, mp = plane_to_grid([LaxPlane(img, pa, "t")], ap, vp.shape, half_thickness=0.49 * 1.5)
    np.testing.assert_allclose(np.flip(gp, 0).transpose(1, 2, 0), g, atol=1e-12)

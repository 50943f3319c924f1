"""Checklist C (seeds)."""

import torch

from mgdcr.infer import make_seeds, seed_fractions, slerp


def test_c1_seed_count_positions_and_fractions():
    torch.manual_seed(0)
    n, K = 4, 8
    xt = torch.randn(n, 1, 6, 6)
    z = torch.randn(n, 5)
    xs, zs = make_seeds(xt, z, K)
    assert xs.shape[0] == zs.shape[0] == K * (n - 1) + 1
    for m in range(n):
        assert torch.equal(xs[m * K], xt[m]) and torch.equal(zs[m * K], z[m])
    for m in range(n - 1):
        for k in range(1, K):
            torch.testing.assert_close(zs[m * K + k], (1 - k / K) * z[m] + (k / K) * z[m + 1])
            torch.testing.assert_close(xs[m * K + k], slerp(xt[m], xt[m + 1], k / K))
    assert seed_fractions(8) == [k / 8 for k in range(8)]


def test_c2_slerp_properties():
    a, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b)
    e1 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    e2 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    for alpha in (0.1, 0.37, 0.5, 0.9):
        assert abs(slerp(e1, e2, alpha).norm().item() - 1.0) < 1e-12
    # θ ≈ 0: falls back to lerp (no division by sin θ = 0)
    c = 2.0 * e1
    out = slerp(e1, c, 0.25)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 0.75 * e1 + 0.25 * c)


def test_c3_fork_positions_regression():
    assert seed_fractions(8, "fork") == [0.0, 0.0] + [j / 7 for j in range(1, 7)]
    xt = torch.randn(2, 1, 4, 4)
    z = torch.randn(2, 3)
    xs, zs = make_seeds(xt, z, 8, "fork")
    assert xs.shape[0] == 9
    assert torch.equal(zs[1], z[0])  # the left slice is repeated (fork bug)
    torch.testing.assert_close(zs[2], (6 / 7) * z[0] + (1 / 7) * z[1])
    _, zg = make_seeds(xt, z, 8, "grid")
    torch.testing.assert_close(zg[2], (6 / 8) * z[0] + (2 / 8) * z[1])

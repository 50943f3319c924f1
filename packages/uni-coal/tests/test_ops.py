"""Spec §8.1-2: ops agree with a naive implementation, gradcheck, filter design."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.signal
import torch
import torch.nn.functional as F

from uni_coal import ops


def naive_filtered_lrelu(x, fu, fd, b, up, down, pad, gain=math.sqrt(2), slope=0.2, clamp=256):
    """bias, zero-insert, pad/crop, depthwise conv with outer(fu,fu)*up^2, lrelu*gain, clamp, conv fd, stride."""
    n, c, h, w = x.shape
    x = x + b[None, :, None, None]
    z = torch.zeros(n, c, h * up, w * up, dtype=x.dtype)
    z[:, :, ::up, ::up] = x
    px0, px1, py0, py1 = pad
    z = F.pad(z, [max(px0, 0), max(px1, 0), max(py0, 0), max(py1, 0)])
    z = z[:, :, max(-py0, 0) : z.shape[2] - max(-py1, 0), max(-px0, 0) : z.shape[3] - max(-px1, 0)]
    ku = torch.outer(fu, fu).flip([0, 1]) * up**2
    z = F.conv2d(z, ku[None, None].repeat(c, 1, 1, 1).to(x.dtype), groups=c)
    z = (F.leaky_relu(z, slope) * gain).clamp(-clamp, clamp)
    kd = torch.outer(fd, fd).flip([0, 1])
    z = F.conv2d(z, kd[None, None].repeat(c, 1, 1, 1).to(x.dtype), groups=c)
    return z[:, :, ::down, ::down]


CASES = [  # (up, down, in size after the 3x3 'full' conv, out size, taps up/down, padding), spec §2 table
    (2, 2, 38, 36, 12, 12, [9, 8, 9, 8]),  # L0: 36 -> 36
    (4, 2, 38, 52, 24, 12, [-6, -9, -6, -9]),  # L3: 36 -> 52
    (2, 2, 42, 20, 12, 12, [-11, -12, -11, -12]),  # L13-style crop, scaled down (full size below)
]


@pytest.mark.parametrize("up,down,n_in,n_out,tu,td,pad", CASES)
def test_filtered_lrelu_matches_naive(up, down, n_in, n_out, tu, td, pad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, n_in, n_in, generator=g) * 3
    b = torch.randn(3, generator=g)
    fu = ops.design_lowpass_filter(tu, 4.0, 8.0, 16.0 * up)
    fd = ops.design_lowpass_filter(td, 5.0, 10.0, 16.0 * up)
    y = ops.filtered_lrelu(x, fu, fd, b, up=up, down=down, padding=pad, clamp=256)
    ref = naive_filtered_lrelu(x.double(), fu.double(), fd.double(), b.double(), up, down, pad).float()
    assert y.shape[-1] == n_out
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() < 1e-5


def test_filtered_lrelu_276_to_256_crop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 278, 278, generator=g)
    fu = ops.design_lowpass_filter(12, 128.0, 2 * 29.586484908149288, 512)
    y = ops.filtered_lrelu(x, fu, fu, torch.zeros(2), up=2, down=2, padding=[-11, -12, -11, -12], clamp=256)
    ref = naive_filtered_lrelu(
        x.double(), fu.double(), fu.double(), torch.zeros(2, dtype=torch.float64), 2, 2, [-11, -12, -11, -12]
    ).float()
    assert y.shape == (1, 2, 256, 256)
    assert (y - ref).abs().max().item() < 1e-5


def test_upfirdn2d_matches_naive_2d_filter():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64)
    f = ops.setup_filter([1, 3, 3, 1]).double()
    y = ops.upfirdn2d(x, f, up=2, down=1, padding=[2, 1, 2, 1], gain=4)
    z = torch.zeros(2, 3, 18, 22, dtype=torch.float64)
    z[:, :, ::2, ::2] = x
    z = F.pad(z, [2, 1, 2, 1])
    ref = F.conv2d(z, (f.flip([0, 1]) * 4)[None, None].repeat(3, 1, 1, 1), groups=3)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_gradcheck_fp64():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    fu = ops.design_lowpass_filter(12, 2.0, 4.0, 16).double()
    torch.autograd.gradcheck(
        lambda x, b: ops.filtered_lrelu(x, fu, fu, b, up=2, down=2, padding=[9, 8, 9, 8]), (x, b)
    )
    torch.autograd.gradcheck(lambda x: ops.upfirdn2d(x, fu, up=2, down=2, padding=3), (x,))
    torch.autograd.gradcheck(lambda x, b: ops.bias_act(x, b, act="lrelu", clamp=0.5), (x, b))
    # second order (R1 double backward path)
    torch.autograd.gradgradcheck(lambda x: ops.upfirdn2d(x, fu, down=2, padding=5), (x,))


def test_bias_act_definition():
    x = torch.tensor([[-2.0, 1.0]])
    y = ops.bias_act(x, torch.tensor([0.5, 0.5]), act="lrelu", clamp=1.0)
    assert torch.allclose(y, torch.tensor([[-0.3 * math.sqrt(2), 1.0]]))


def test_kaiser_filter_is_firwin():
    f = ops.design_lowpass_filter(24, 4.0, 8.0, 64)
    np.testing.assert_allclose(f.numpy(), scipy.signal.firwin(24, 4.0, width=8.0, fs=64).astype(np.float32))
    assert ops.design_lowpass_filter(1, 4.0, 8.0, 64) is None
    assert abs(float(f.sum()) - 1.0) < 1e-6

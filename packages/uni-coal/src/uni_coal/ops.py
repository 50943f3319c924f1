"""Pure-PyTorch versions of the StyleGAN3 custom ops used by Uni-COAL (spec §2 "Custom ops").

``bias_act``, ``upfirdn2d``, ``filtered_lrelu``, ``conv2d_resample`` and ``modulated_conv2d`` follow the
semantics of the NVlabs reference paths (the official code runs those on CPU). Everything is plain autograd,
so the double backward of R1 works on CPU. Filters run as separable 1-D passes over the ``[B, C, H, W]``
tensor as depthwise grouped convolutions (no loop over channels); down-sampling is folded into the convolution stride.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.signal
import torch
import torch.nn.functional as F

__all__ = [
    "bias_act",
    "conv2d_resample",
    "design_lowpass_filter",
    "filter2d",
    "filtered_lrelu",
    "modulated_conv2d",
    "setup_filter",
    "upfirdn2d",
]

_ACTS = {
    "linear": (lambda x, a: x, 0.0, 1.0),
    "relu": (lambda x, a: F.relu(x), 0.0, math.sqrt(2)),
    "lrelu": (lambda x, a: F.leaky_relu(x, a), 0.2, math.sqrt(2)),
}


def bias_act(
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    dim: int = 1,
    act: str = "linear",
    alpha: float | None = None,
    gain: float | None = None,
    clamp: float | None = None,
) -> torch.Tensor:
    """``clamp(act(x + b) * gain)``; lrelu's default gain is sqrt(2) (spec §2)."""
    func, def_alpha, def_gain = _ACTS[act]
    alpha = float(def_alpha if alpha is None else alpha)
    gain = float(def_gain if gain is None else gain)
    if b is not None:
        x = x + b.reshape([-1 if i == dim else 1 for i in range(x.ndim)])
    x = func(x, alpha)
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def setup_filter(f, normalize: bool = True, gain: float = 1.0, separable: bool | None = None) -> torch.Tensor:
    """FIR filter as upfirdn2d expects it: 1-D (separable) when it has >= 8 taps, else its outer product."""
    f = torch.as_tensor(1.0 if f is None else f, dtype=torch.float32)
    if f.ndim == 0:
        f = f[None]
    if separable is None:
        separable = f.ndim == 1 and f.numel() >= 8
    if f.ndim == 1 and not separable:
        f = torch.outer(f, f)
    if normalize:
        f = f / f.sum()
    return f * (gain ** (f.ndim / 2))


def design_lowpass_filter(numtaps: int, cutoff: float, width: float, fs: float) -> torch.Tensor | None:
    """Separable Kaiser low-pass, ``scipy.signal.firwin`` semantics; ``None`` is the identity (1 tap)."""
    if numtaps < 1:
        raise ValueError("numtaps must be >= 1")
    if numtaps == 1:
        return None
    return torch.as_tensor(
        scipy.signal.firwin(numtaps=numtaps, cutoff=cutoff, width=width, fs=fs), dtype=torch.float32
    )


def _parse_padding(padding) -> tuple[int, int, int, int]:
    if isinstance(padding, int | np.integer):
        padding = [int(padding)] * 2
    padding = [int(p) for p in padding]
    if len(padding) == 2:
        padding = [padding[0], padding[0], padding[1], padding[1]]
    return tuple(padding)  # type: ignore[return-value]


def _filter_size(f: torch.Tensor | None) -> tuple[int, int]:
    if f is None:
        return 1, 1
    return int(f.shape[-1]), int(f.shape[0])


def upfirdn2d(
    x: torch.Tensor,
    f: torch.Tensor | None,
    up: int = 1,
    down: int = 1,
    padding=0,
    flip_filter: bool = False,
    gain: float = 1.0,
) -> torch.Tensor:
    """Zero-insert upsample by ``up``, pad (negative = crop), FIR filter, keep every ``down``-th sample.

    The filter is convolved (flipped) unless ``flip_filter``; a 1-D filter runs as two passes, each
    with ``gain ** 0.5``, exactly like the NVlabs reference.
    """
    b, c, h, w = x.shape
    px0, px1, py0, py1 = _parse_padding(padding)
    if f is None:
        f = torch.ones([1, 1], dtype=torch.float32, device=x.device)
    f = (f * (gain ** (f.ndim / 2))).to(device=x.device, dtype=x.dtype)
    if not flip_filter:
        f = f.flip(list(range(f.ndim)))
    if f.ndim == 1:
        # Separable: the W pass runs before the zero rows of the H up-sampling exist (same sums, less work).
        y = _up_pad(x, up, px0, px1, axis=3)
        y = F.conv2d(y, f[None, None, None, :].expand(c, 1, 1, -1), stride=(1, down), groups=c)
        y = _up_pad(y, up, py0, py1, axis=2)
        return F.conv2d(y, f[None, None, :, None].expand(c, 1, -1, 1), stride=(down, 1), groups=c)
    y = _up_pad(_up_pad(x, up, px0, px1, axis=3), up, py0, py1, axis=2)
    if f.numel() == 1:
        y = y * f.reshape([])
        return y[:, :, ::down, ::down] if down > 1 else y
    # depthwise (grouped) convolution: one filter shared by all channels, no loop over channels
    return F.conv2d(y, f[None, None].expand(c, 1, *f.shape), stride=down, groups=c)


def _up_pad(x: torch.Tensor, up: int, p0: int, p1: int, axis: int) -> torch.Tensor:
    """Zero insertion (each sample followed by up-1 zeros) and pad/crop along one spatial axis."""
    if up > 1:
        x = x.unsqueeze(axis + 1)
        pad = [0, 0] * (x.ndim - axis - 2) + [0, up - 1]
        x = F.pad(x, pad).flatten(axis, axis + 1)
    pad = [0, 0] * (x.ndim - axis - 1) + [max(p0, 0), max(p1, 0)]
    x = F.pad(x, pad)
    return x.narrow(axis, max(-p0, 0), x.shape[axis] - max(-p0, 0) - max(-p1, 0))


def filter2d(x: torch.Tensor, f: torch.Tensor, padding=0, gain: float = 1.0) -> torch.Tensor:
    """Same-size FIR filtering (used by the blur warm-up, spec §4)."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fw, fh = _filter_size(f)
    p = [px0 + fw // 2, px1 + (fw - 1) // 2, py0 + fh // 2, py1 + (fh - 1) // 2]
    return upfirdn2d(x, f, padding=p, gain=gain)


def filtered_lrelu(
    x: torch.Tensor,
    fu: torch.Tensor | None = None,
    fd: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding=0,
    gain: float = math.sqrt(2),
    slope: float = 0.2,
    clamp: float | None = None,
) -> torch.Tensor:
    """bias -> upsample (fu, gain up^2) -> lrelu*gain -> clamp -> downsample (fd), spec §2 step 2."""
    px0, px1, py0, py1 = _parse_padding(padding)
    fu_w, fu_h = _filter_size(fu)
    fd_w, fd_h = _filter_size(fd)
    out_w = (x.shape[3] * up + px0 + px1 - (fu_w - 1) - (fd_w - 1) + (down - 1)) // down
    out_h = (x.shape[2] * up + py0 + py1 - (fu_h - 1) - (fd_h - 1) + (down - 1)) // down
    x = bias_act(x, b)
    x = upfirdn2d(x, fu, up=up, padding=[px0, px1, py0, py1], gain=up**2)
    x = bias_act(x, act="lrelu", alpha=slope, gain=gain, clamp=clamp)
    x = upfirdn2d(x, fd, down=down)
    if x.shape[2] != out_h or x.shape[3] != out_w:
        raise RuntimeError(f"filtered_lrelu produced {tuple(x.shape[2:])}, expected {(out_h, out_w)}")
    return x


def conv2d_resample(
    x: torch.Tensor, w: torch.Tensor, f: torch.Tensor | None = None, down: int = 1, padding: int = 0
) -> torch.Tensor:
    """StyleGAN2 ``conv2d_resample`` for the cases the discriminator uses (up=1, down in {1, 2})."""
    kh, kw = int(w.shape[2]), int(w.shape[3])
    fw, fh = _filter_size(f)
    px0 = px1 = py0 = py1 = int(padding)
    if down > 1:
        px0 += (fw - down + 1) // 2
        px1 += (fw - down) // 2
        py0 += (fh - down + 1) // 2
        py1 += (fh - down) // 2
        if kw == 1 and kh == 1:
            x = upfirdn2d(x, f, down=down, padding=[px0, px1, py0, py1])
            return F.conv2d(x, w)
        x = upfirdn2d(x, f, padding=[px0, px1, py0, py1])
        return F.conv2d(x, w, stride=down)
    if px0 == px1 and py0 == py1 and px0 >= 0:
        return F.conv2d(x, w, padding=[py0, px0])
    x = upfirdn2d(x, None, padding=[px0, px1, py0, py1])
    return F.conv2d(x, w)


def modulated_conv2d(
    x: torch.Tensor,
    w: torch.Tensor,
    s: torch.Tensor,
    demodulate: bool = True,
    padding: int = 0,
    input_gain: torch.Tensor | None = None,
) -> torch.Tensor:
    """StyleGAN3 modulated convolution as one grouped conv (pre-normalised when demodulating)."""
    batch = x.shape[0]
    out_c, in_c, kh, kw = w.shape
    if s.shape != (batch, in_c):
        raise ValueError(f"styles must be [{batch}, {in_c}], got {tuple(s.shape)}")
    if demodulate:
        w = w * w.square().mean([1, 2, 3], keepdim=True).rsqrt()
        s = s * s.square().mean().rsqrt()
    w = w.unsqueeze(0) * s[:, None, :, None, None]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
    if input_gain is not None:
        w = w * input_gain.expand(batch, in_c)[:, None, :, None, None]
    y = F.conv2d(
        x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, in_c, kh, kw).to(x.dtype), padding=padding, groups=batch
    )
    return y.reshape(batch, -1, *y.shape[2:])

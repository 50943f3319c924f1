"""Pixel-wise errors (MSE, RMSE, MAE, PSNR) and the SSIM family (SSIM, MS-SSIM), 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytorch_msssim
import torch
import torch.nn.functional as F

from medsynth_core.metrics._common import Reduction, _as_float, _check_pair, _reduce

# ----------------------------------------------------------------------------------------------
# pixel-wise errors
# ----------------------------------------------------------------------------------------------


def mse(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "none") -> torch.Tensor:
    """Mean squared error per sample, averaged over all non-batch elements -> ``(B,)``."""
    _check_pair(x, y, "mse")
    x, y = _as_float(x, y)
    return _reduce((x - y).pow(2).flatten(1).mean(1), reduction)


def rmse(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "none") -> torch.Tensor:
    """Root mean squared error per sample (``sqrt`` of :func:`mse`) -> ``(B,)``."""
    return _reduce(mse(x, y).sqrt(), reduction)


def mae(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "none") -> torch.Tensor:
    """Mean absolute error per sample, averaged over all non-batch elements -> ``(B,)``.

    Not range-normalised: the value scales with the intensity range (MAE on [-1, 1] images is twice
    the MAE of the same images mapped to [0, 1]).
    """
    _check_pair(x, y, "mae")
    x, y = _as_float(x, y)
    return _reduce((x - y).abs().flatten(1).mean(1), reduction)


def psnr(
    x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor, reduction: Reduction = "none"
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample: ``10 * log10(data_range**2 / MSE)`` -> ``(B,)``.

    Same definition as ``skimage.metrics.peak_signal_noise_ratio`` applied to each sample, with the
    MSE taken over all non-batch elements (channels and spatial dims). ``data_range`` is a float or
    a per-sample tensor of shape ``(B,)``. Identical images (MSE = 0) give ``+inf``; with
    ``reduction="mean"`` a single identical pair therefore makes the mean ``+inf`` as well.
    """
    err = mse(x, y)
    dr = torch.as_tensor(data_range, dtype=err.dtype, device=err.device)
    if torch.any(dr <= 0):
        raise ValueError(f"psnr: data_range must be positive, got {data_range}")
    return _reduce(10.0 * torch.log10(dr**2 / err), reduction)


# ----------------------------------------------------------------------------------------------
# SSIM family
# ----------------------------------------------------------------------------------------------


def _box_mean_valid(t: torch.Tensor, win_size: int) -> torch.Tensor:
    """Separable ``win_size``-wide uniform mean over each spatial axis, no padding ('valid')."""
    nd = t.ndim - 2
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    for axis in range(nd):
        kernel = [1] * nd
        kernel[axis] = win_size
        t = pool(t, kernel_size=kernel, stride=1)
    return t


def _ssim_uniform(
    x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int, k: tuple[float, float]
) -> torch.Tensor:
    channels = x.shape[1]
    stats = _box_mean_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), win_size)
    ux, uy, uxx, uyy, uxy = stats.split(channels, dim=1)
    n = win_size ** (x.ndim - 2)
    cov_norm = n / (n - 1.0)  # sample covariance, as skimage's use_sample_covariance=True
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # mean over the valid region per channel, then over channels (skimage channel_axis behaviour)
    return s_map.flatten(2).mean(-1).mean(1)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    window: Literal["gaussian", "uniform"] = "gaussian",
    win_size: int | None = None,
    win_sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Structural similarity per sample (mean over the SSIM map, channels averaged) -> ``(B,)``.

    ``window="gaussian"`` (default) follows ``pytorch_msssim.ssim``: a separable Gaussian window of
    ``win_size=11`` taps with ``win_sigma=1.5``, constants ``K=(0.01, 0.03)``, population
    (biased) variances, and *valid* convolution, i.e. the SSIM map only covers positions where the
    whole window fits, so the mean is over the interior ``(H - win_size + 1) x (W - win_size + 1)``
    [x ``(D - win_size + 1)``] region. Works for 2D and 3D.

    ``window="uniform"`` reproduces ``skimage.metrics.structural_similarity`` defaults exactly:
    a ``7 x 7`` (2D) or ``7 x 7 x 7`` (3D) uniform window, ``K1=0.01``, ``K2=0.03``, sample
    covariance (``use_sample_covariance=True``, i.e. covariances scaled by ``N / (N - 1)``), and
    the mean SSIM over the image cropped by ``(win_size - 1) // 2`` on every side; channels are
    averaged as with ``channel_axis``.

    Every spatial dimension must be at least ``win_size``; ``win_size`` must be odd.
    """
    if window not in ("gaussian", "uniform"):
        raise ValueError(f"ssim: window must be 'gaussian' or 'uniform', got {window!r}")
    _check_pair(x, y, "ssim", ndims=(4, 5))
    x, y = _as_float(x, y)
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be positive, got {data_range}")
    if win_size is None:
        win_size = 11 if window == "gaussian" else 7
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be an odd integer >= 3, got {win_size}")
    spatial = tuple(x.shape[2:])
    if min(spatial) < win_size:
        raise ValueError(
            f"ssim: every spatial dimension must be >= win_size={win_size} ({window} window), "
            f"got spatial shape {spatial}; pass a smaller odd win_size"
        )
    if window == "gaussian":
        values = pytorch_msssim.ssim(
            x, y, data_range=data_range, size_average=False, win_size=win_size, win_sigma=win_sigma, K=k
        )
    else:
        values = _ssim_uniform(x, y, data_range, win_size, k)
    return _reduce(values, reduction)


_MS_SSIM_DEFAULT_LEVELS = 5


def ms_ssim_min_size(win_size: int = 11, levels: int = _MS_SSIM_DEFAULT_LEVELS) -> int:
    """Smallest spatial size :func:`ms_ssim` accepts: ``(win_size - 1) * 2**max(4, levels - 1) + 1``.

    pytorch_msssim downsamples ``levels - 1`` times by 2 and asserts that the in-plane sides exceed
    ``(win_size - 1) * 16``; here the same bound (or the stricter one for more than 5 levels) is
    applied to every spatial dimension, depth included, so no scale silently skips smoothing.
    """
    return (win_size - 1) * 2 ** max(4, levels - 1) + 1


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    weights: Sequence[float] | None = None,
    win_size: int = 11,
    win_sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Multi-scale SSIM per sample via ``pytorch_msssim.ms_ssim`` -> ``(B,)``; 2D and 3D.

    Default scale weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` (5 scales), Gaussian
    window 11/1.5, ``K=(0.01, 0.03)``, valid convolution and 2x average-pool downsampling.
    Every spatial dimension must be at least :func:`ms_ssim_min_size` (161 for ``win_size=11``
    and 5 scales, 33 for ``win_size=3``); smaller inputs raise ``ValueError``.
    """
    _check_pair(x, y, "ms_ssim", ndims=(4, 5))
    x, y = _as_float(x, y)
    if data_range <= 0:
        raise ValueError(f"ms_ssim: data_range must be positive, got {data_range}")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ms_ssim: win_size must be an odd integer >= 3, got {win_size}")
    levels = _MS_SSIM_DEFAULT_LEVELS if weights is None else len(weights)
    if levels < 1:
        raise ValueError("ms_ssim: weights must not be empty")
    need = ms_ssim_min_size(win_size, levels)
    spatial = tuple(x.shape[2:])
    if min(spatial) < need:
        raise ValueError(
            f"ms_ssim: input too small: every spatial dimension must be >= {need} for win_size={win_size} "
            f"and {levels} scales, got spatial shape {spatial}; use ssim() or a smaller win_size"
        )
    values = pytorch_msssim.ms_ssim(
        x,
        y,
        data_range=data_range,
        size_average=False,
        win_size=win_size,
        win_sigma=win_sigma,
        weights=None if weights is None else list(weights),
        K=k,
    )
    return _reduce(values, reduction)

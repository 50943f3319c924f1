"""Evaluation metrics shared by the medsynth packages.

Conventions used throughout:

* Images are torch tensors shaped ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D).
* Every intensity-dependent metric takes an explicit ``data_range`` (max - min of the
  intensity scale, e.g. ``1.0`` for [0, 1] images and ``2.0`` for [-1, 1] images); nothing is
  inferred from the data.
* Image metrics return one value per sample, shape ``(B,)`` (``reduction="none"``, the default),
  so callers average per slice / per volume instead of pooling errors over a batch.
  ``reduction="mean"`` returns the mean of those per-sample values.
* Segmentation metrics return ``(B, K')`` (one value per sample and class); their
  ``reduction="mean"`` is a NaN-aware mean over the batch, giving ``(K',)``.
* Distribution metrics (:func:`frechet_distance`, :func:`mmd`) compare two sets of feature
  vectors and return a 0-d tensor.

Only torch, monai, pytorch_msssim and (lazily) lpips are used at runtime. MONAI and lpips
are imported inside the functions that need them, so importing this module stays cheap.
"""

from medsynth_core.metrics._common import MetricUnavailable
from medsynth_core.metrics.deformation import jacobian_determinant, negative_jacobian_fraction
from medsynth_core.metrics.distribution import extract_features, frechet_distance, mmd
from medsynth_core.metrics.image import mae, ms_ssim, ms_ssim_min_size, mse, psnr, rmse, ssim
from medsynth_core.metrics.perceptual import LPIPS, lpips_or_none
from medsynth_core.metrics.segmentation import dice, hd95

__all__ = [
    "LPIPS",
    "MetricUnavailable",
    "dice",
    "extract_features",
    "frechet_distance",
    "hd95",
    "jacobian_determinant",
    "lpips_or_none",
    "mae",
    "mmd",
    "ms_ssim",
    "ms_ssim_min_size",
    "mse",
    "negative_jacobian_fraction",
    "psnr",
    "rmse",
    "ssim",
]

"""Distribution metrics over feature vectors (Frechet distance, MMD) and feature extraction."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

# ----------------------------------------------------------------------------------------------
# distribution metrics over feature vectors
# ----------------------------------------------------------------------------------------------


def _check_feats(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name}: expected (N, F) and (M, F) feature matrices, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    return a.detach().double(), b.detach().double().to(a.device)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula) -> 0-d tensor.

    ``||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})`` with unbiased (N - 1)
    covariances, in float64 - the same quantity as ``monai.metrics.FIDMetric``. The trace of the
    matrix square root is computed as the sum of the square roots of the (clamped non-negative)
    eigenvalues of the symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}``, which is similar to
    ``S_a S_b``; this needs no scipy (MONAI's version calls ``scipy.linalg.sqrtm(..., disp=False)``,
    an argument scipy deprecates and schedules for removal in 1.18), never yields an imaginary
    part, and runs on any torch device. Inputs are ``(N, F)`` and ``(M, F)``; use
    :func:`extract_features` to obtain them. Values depend on the feature extractor and the sample
    sizes; only compare scores computed the same way.
    """
    a, b = _check_feats(feats_a, feats_b, "frechet_distance")
    f = a.shape[1]
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(f, f)
    cov_b = torch.cov(b.T).reshape(f, f)
    evals_a, evecs_a = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs_a * evals_a.clamp_min(0).sqrt()) @ evecs_a.T
    inner = sqrt_a @ cov_b @ sqrt_a
    inner = 0.5 * (inner + inner.T)
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    return (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2.0 * tr_covmean


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min(0.0)


def mmd(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    kernel: Literal["linear", "rbf"] = "linear",
    sigma: float | None = None,
    unbiased: bool = True,
) -> torch.Tensor:
    """Squared maximum mean discrepancy between two feature sets ``(N, F)`` and ``(M, F)`` -> 0-d.

    ``unbiased=True`` (default) is the U-statistic
    ``mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)``; its expectation
    is 0 for equal distributions, so it can be slightly negative (and ``mmd(A, A)`` is small but
    not exactly 0). ``unbiased=False`` includes the diagonal terms (V-statistic): always >= 0 and
    exactly 0 for identical sets. Kernels: ``"linear"`` ``k(a, b) = a . b`` (for equal set sizes the
    unbiased value equals ``monai.metrics.MMDMetric`` with no ``y_mapping``, which works on
    flattened images rather than arbitrary feature sets) and ``"rbf"``
    ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` with ``sigma`` defaulting to the median pairwise
    distance of the pooled sets (evenly subsampled to 2000 points when larger). Computed in float64.
    """
    a, b = _check_feats(feats_a, feats_b, "mmd")
    if kernel == "linear":
        kaa, kbb, kab = a @ a.T, b @ b.T, a @ b.T
    elif kernel == "rbf":
        daa, dbb, dab = _pairwise_sq_dists(a, a), _pairwise_sq_dists(b, b), _pairwise_sq_dists(a, b)
        if sigma is None:
            pooled = torch.cat([a, b], 0)
            if pooled.shape[0] > 2000:  # bound the cost of the bandwidth heuristic
                pooled = pooled[torch.linspace(0, pooled.shape[0] - 1, 2000, device=pooled.device).long()]
            d = _pairwise_sq_dists(pooled, pooled)
            off = d[~torch.eye(d.shape[0], dtype=torch.bool, device=d.device)]
            sigma = float(off.sqrt().median())
            if sigma <= 0:
                sigma = 1.0
        if sigma <= 0:
            raise ValueError(f"mmd: sigma must be positive, got {sigma}")
        gamma = 1.0 / (2.0 * sigma**2)
        kaa, kbb, kab = torch.exp(-gamma * daa), torch.exp(-gamma * dbb), torch.exp(-gamma * dab)
    else:
        raise ValueError(f"mmd: kernel must be 'linear' or 'rbf', got {kernel!r}")
    n, m = a.shape[0], b.shape[0]
    if unbiased:
        term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
        term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    else:
        term_a = kaa.mean()
        term_b = kbb.mean()
    return term_a + term_b - 2.0 * kab.mean()


def extract_features(
    extractor: Callable[[torch.Tensor], Any],
    batches: Iterable[Any],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Run ``extractor`` over ``batches`` without gradients and stack the outputs -> ``(N, F)`` (on CPU).

    Each batch is a tensor, or a tuple/list whose first element is the image tensor (as yielded by
    many data loaders), or a dict with an ``"image"`` key. An ``nn.Module`` extractor is put in eval
    mode for the call (its previous mode is restored). Outputs that are feature maps
    ``(N, F, *spatial)`` are reduced by global average pooling; a tuple/list output uses its first
    element; ``(N,)`` outputs become ``(N, 1)``.
    """
    was_training = isinstance(extractor, torch.nn.Module) and extractor.training
    if isinstance(extractor, torch.nn.Module):
        extractor.eval()
    feats: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    batch = batch["image"]
                elif isinstance(batch, (tuple, list)):
                    batch = batch[0]
                out = extractor(batch.to(device))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if out.ndim == 1:
                    out = out[:, None]
                elif out.ndim > 2:
                    out = out.flatten(2).mean(-1)
                feats.append(out.detach().cpu())
    finally:
        if was_training:
            extractor.train()
    if not feats:
        raise ValueError("extract_features: no batches were given")
    return torch.cat(feats, 0)

"""Input checks and reductions shared by the metric modules; the :class:`MetricUnavailable` error."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Reduction = Literal["none", "mean"]


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed in this environment (e.g. required weights are not on disk)."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str, ndims: Sequence[int] | None = None) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"{name}: expected torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape:
        raise ValueError(
            f"{name}: inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if ndims is not None and x.ndim not in ndims:
        raise ValueError(
            f"{name}: expected (B, C, H, W) or (B, C, D, H, W) input, got shape {tuple(x.shape)}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name}: expected a batch of at least 1-D samples (B, ...), got {tuple(x.shape)}")


def _as_float(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Promote both inputs to a common floating dtype (float32 for integer/bool inputs)."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return x.to(dtype), y.to(dtype)


def _reduce(values: torch.Tensor, reduction: str, nan_aware: bool = False) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        if nan_aware:
            return torch.nanmean(values, dim=0)
        return values.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")

"""Segmentation overlap and surface distance (Dice, HD95) on MONAI metrics."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medsynth_core.metrics._common import Reduction, _reduce

# ----------------------------------------------------------------------------------------------
# segmentation overlap / surface distance (MONAI)
# ----------------------------------------------------------------------------------------------


def _to_onehot(t: torch.Tensor, num_classes: int | None, name: str) -> torch.Tensor:
    """Label map (integer dtype; ``(B, 1, *sp)`` or ``(B, *sp)``) or one-hot ``(B, K, *sp)`` -> one-hot."""
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        if not torch.all((t == 0) | (t == 1)):
            raise ValueError(
                f"{name}: floating/bool inputs are read as one-hot (B, K, *spatial) masks and must be 0/1; "
                "pass integer label maps as an integer dtype (e.g. .long())"
            )
        if t.ndim < 3:
            raise ValueError(f"{name}: expected (B, K, *spatial) one-hot masks, got {tuple(t.shape)}")
        t = t.float()
        if t.shape[1] == 1:  # single binary foreground channel -> (background, foreground)
            t = torch.cat([1.0 - t, t], dim=1)
        if num_classes is not None and t.shape[1] != num_classes:
            raise ValueError(f"{name}: one-hot input has {t.shape[1]} channels but num_classes={num_classes}")
        return t
    if t.ndim >= 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected a label map (B, 1, *spatial) or (B, *spatial), got {tuple(t.shape)}"
        )
    if t.min() < 0 or t.max() >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes - 1}], got [{int(t.min())}, {int(t.max())}]"
        )
    return F.one_hot(t.long(), num_classes).movedim(-1, 1).float()


def _is_label_map(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype == torch.bool)


def _seg_pair(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if num_classes is None and (_is_label_map(pred) or _is_label_map(target)):
        onehot = [t for t in (pred, target) if not _is_label_map(t)]
        if onehot:
            num_classes = max(onehot[0].shape[1], 2)
        else:
            num_classes = max(int(pred.max()), int(target.max()), 1) + 1
    p = _to_onehot(pred, num_classes, "pred")
    t = _to_onehot(target, num_classes, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target one-hot shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t


def dice(
    pred: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = False,
    num_classes: int | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Per-sample, per-class Dice via ``monai.metrics.compute_dice`` -> ``(B, K')``.

    Inputs: integer label maps ``(B, 1, *spatial)`` or ``(B, *spatial)`` (one-hot encoded with
    ``num_classes``; inferred as ``max label + 1`` when omitted, so pass it explicitly for stable
    class counts), or 0/1 float/bool one-hot masks ``(B, K, *spatial)`` (``K = 1`` is read as a
    binary foreground mask). ``K' = K - 1`` unless ``include_background``.

    NaN behaviour (MONAI ``ignore_empty=True``): a class absent from ``target`` gives NaN for that
    sample (whatever the prediction); present in target but absent in pred gives 0. Average with
    ``torch.nanmean``; ``reduction="mean"`` is the NaN-aware mean over the batch -> ``(K',)``.
    """
    from monai.metrics import compute_dice

    p, t = _seg_pair(pred, target, num_classes)
    values = compute_dice(p, t, include_background=include_background, ignore_empty=True)
    return _reduce(values, reduction, nan_aware=True)


def hd95(
    pred: torch.Tensor,
    target: torch.Tensor,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
    num_classes: int | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per sample and class -> ``(B, K')``.

    ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=spacing)``: Euclidean
    distances between the boundary voxels of the two masks in both directions, in physical
    units when ``spacing`` (one value, or one per spatial axis in tensor order) is given, else in
    voxels. Input formats as in :func:`dice`.

    NaN behaviour (MONAI 1.6): a class empty in ``target`` or in ``pred`` (or both) gives NaN for
    that sample, with a MONAI warning. ``reduction="mean"`` is the NaN-aware mean over the batch.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = _seg_pair(pred, target, num_classes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        values = compute_hausdorff_distance(
            p, t, include_background=include_background, percentile=95, spacing=spacing
        )
    return _reduce(values, reduction, nan_aware=True)

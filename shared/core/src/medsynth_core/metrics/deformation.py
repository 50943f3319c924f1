"""Deformation-field metrics: Jacobian determinant and the fraction of folding voxels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from medsynth_core.metrics._common import Reduction, _reduce

# ----------------------------------------------------------------------------------------------
# deformation fields
# ----------------------------------------------------------------------------------------------


def jacobian_determinant(
    ddf: torch.Tensor,
    spacing: float | Sequence[float] | None = None,
    scheme: Literal["central", "forward"] = "central",
) -> torch.Tensor:
    """Jacobian determinant ``det(I + grad u)`` of a dense displacement field -> ``(B, *spatial)``.

    ``ddf`` is ``(B, ndim, *spatial)`` with ``ndim`` in {2, 3}; channel ``c`` is the displacement
    along spatial axis ``c`` (tensor order: ``(H, W)`` or ``(D, H, W)``). Without ``spacing`` the
    displacements are in voxels and derivatives are per voxel. With ``spacing`` (scalar or one value
    per axis) the displacements are taken to be in the same physical units as ``spacing`` and the
    derivatives are per physical unit. Derivatives use ``torch.gradient`` (central differences in
    the interior, one-sided first-order differences at the borders, ``edge_order=1``), so every
    spatial size must be >= 2. A zero field gives 1 everywhere; values <= 0 indicate folding.

    ``scheme="forward"`` uses forward differences ``u[i+1] - u[i]`` instead (as some registration
    losses do) and returns the ``(B, *(spatial - 1))`` grid where all of them are defined.
    """
    if ddf.ndim < 4:
        raise ValueError(f"jacobian_determinant: expected (B, ndim, *spatial), got {tuple(ddf.shape)}")
    nd = ddf.ndim - 2
    if nd not in (2, 3) or ddf.shape[1] != nd:
        raise ValueError(
            f"jacobian_determinant: a {nd}-D field needs {nd} displacement channels and nd in (2, 3); "
            f"got shape {tuple(ddf.shape)}"
        )
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"jacobian_determinant: every spatial size must be >= 2, got {tuple(ddf.shape[2:])}")
    if not ddf.dtype.is_floating_point:
        ddf = ddf.to(torch.get_default_dtype())
    if spacing is None:
        steps = [1.0] * nd
    elif isinstance(spacing, (int, float)):
        steps = [float(spacing)] * nd
    else:
        steps = [float(s) for s in spacing]
        if len(steps) != nd:
            raise ValueError(f"jacobian_determinant: spacing needs {nd} values, got {len(steps)}")
    if scheme == "central":
        grads = torch.gradient(ddf, spacing=steps, dim=tuple(range(2, 2 + nd)), edge_order=1)
    elif scheme == "forward":
        inner = (slice(None), slice(None)) + tuple(slice(0, n - 1) for n in ddf.shape[2:])
        grads = [(torch.diff(ddf, dim=2 + a) / steps[a])[inner] for a in range(nd)]
    else:
        raise ValueError(f"jacobian_determinant: scheme must be 'central' or 'forward', got {scheme!r}")
    # j[c][d] = d(x_c + u_c) / d x_d
    j = [[grads[d][:, c] + (1.0 if c == d else 0.0) for d in range(nd)] for c in range(nd)]
    if nd == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def negative_jacobian_fraction(
    ddf: torch.Tensor,
    mask: torch.Tensor | None = None,
    spacing: float | Sequence[float] | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Fraction of voxels with ``det(I + grad u) <= 0`` per sample -> ``(B,)``.

    ``mask`` (``(B, *spatial)`` or ``(B, 1, *spatial)``, nonzero = counted) restricts the count to a
    region; a sample with an empty mask gives NaN. See :func:`jacobian_determinant` for conventions.
    """
    det = jacobian_determinant(ddf, spacing=spacing)
    folded = (det <= 0).to(det.dtype)
    if mask is None:
        values = folded.flatten(1).mean(1)
    else:
        if mask.ndim == det.ndim + 1 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != det.shape:
            raise ValueError(
                f"negative_jacobian_fraction: mask shape {tuple(mask.shape)} does not match {tuple(det.shape)}"
            )
        m = (mask != 0).to(det.dtype)
        values = (folded * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return _reduce(values, reduction)

"""DRDM losses (spec section 7): distance (MRSE), angle (NCC) and regularisation, with the official scalings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medsynth_core.metrics import jacobian_determinant

from .deform import warp


def recovery_target_warp(
    pred: torch.Tensor, u_lab: torch.Tensor, padding_mode: str = "zeros"
) -> torch.Tensor:
    """``p' = W(psi_hat, U_lab)`` (bilinear; CMR zeros, LCT border padding)."""
    return warp(pred, u_lab, mode="bilinear", padding_mode=padding_mode)


def distance_loss(p: torch.Tensor, u_lab: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``mean ||p'+U||^2 / (||U||^2 + eps)`` with the code's x100 scaling and eps 1e-3 (losses.py MRSE);
    ``eps`` is ``train.dist_eps``."""
    p, u = 100.0 * p, 100.0 * u_lab
    return torch.mean(torch.sum(torch.square(p + u), 1) / (torch.sum(torch.square(u), 1) + eps))


def angle_loss(p: torch.Tensor, u_lab: torch.Tensor) -> torch.Tensor:
    """Per-voxel cosine ``<p', U> / sqrt(|p'|^2 |U|^2 + eps)``, x1e5 scaling, eps 1e-4; optimum -1 (NCC)."""
    p, u = 1e5 * p, 1e5 * u_lab
    return torch.mean(
        torch.sum(p * u, 1) / torch.sqrt(torch.sum(torch.square(p), 1) * torch.sum(torch.square(u), 1) + 1e-4)
    )


def _diff(y: torch.Tensor, axis: int) -> torch.Tensor:
    d = axis + 2
    return y.narrow(d, 1, y.shape[d] - 1) - y.narrow(d, 0, y.shape[d] - 1)


def _padded_diff(y: torch.Tensor, axis: int, front: bool) -> torch.Tensor:
    nd = y.ndim - 2
    dy = _diff(y, axis)
    pad = [0, 0] * nd
    k = 2 * (nd - 1 - axis)  # F.pad lists the last dimension first
    pad[k + (0 if front else 1)] = 1
    return F.pad(dy, pad)


def official_negdetj(y: torch.Tensor) -> torch.Tensor:
    """The official ``negdetj`` "determinant" (Q7): products of differences along the **same** axis
    (2D: H with H; 3D: H, H, W), no identity term, normalised units. Returns ``[B, *S]``."""
    nd = y.ndim - 2
    d = [_padded_diff(y, 0, True), _padded_diff(y, 0, False)]
    if nd == 2:
        return d[0][:, 0] * d[1][:, 1] - d[0][:, 1] * d[1][:, 0]
    d.append(_padded_diff(y, 1, True))
    return (
        d[0][:, 0] * d[1][:, 1] * d[2][:, 2]
        + d[0][:, 1] * d[1][:, 2] * d[2][:, 0]
        + d[0][:, 2] * d[1][:, 0] * d[2][:, 1]
        - d[0][:, 2] * d[1][:, 1] * d[2][:, 0]
        - d[0][:, 0] * d[1][:, 2] * d[2][:, 1]
        - d[0][:, 1] * d[1][:, 0] * d[2][:, 2]
    )


def true_jacobian_det(y: torch.Tensor) -> torch.Tensor:
    """``det(I + grad(S y))`` with forward differences (the Q7 fix term), ``[B, *(S-1)]``."""
    return jacobian_determinant(y * float(y.shape[2]), scheme="forward")


def regularisation_loss(
    y: torch.Tensor, waive: float = 1e-4, detj_weight: float = 2.0, true_negdetj_weight: float = 0.0
) -> torch.Tensor:
    """``Grad(['l1','negdetj'])``: mean over axes of mean(ReLU(|dy| - 1e-4)) + 2 mean(ReLU(-D_official)).

    ``true_negdetj_weight > 0`` adds ``w * mean(ReLU(-det(I + grad S y)))`` (optional fix of Q7)."""
    nd = y.ndim - 2
    l1 = sum(torch.mean(F.relu(torch.abs(_diff(y, a)) - waive)) for a in range(nd)) / nd
    loss = l1 + detj_weight * torch.mean(F.relu(-official_negdetj(y)))
    if true_negdetj_weight:
        loss = loss + true_negdetj_weight * torch.mean(F.relu(-true_jacobian_det(y)))
    return loss


def drdm_loss(
    pred: torch.Tensor,
    u_lab: torch.Tensor,
    padding_mode: str = "zeros",
    w_dist: float = 1.0,
    w_ang: float = 1.0,
    w_reg: float = 10.0,
    detj_weight: float = 2.0,
    true_negdetj_weight: float = 0.0,
    dist_eps: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Total = 1 L_dist + 1 L_ang + 10 L_reg (spec section 7); returns every term."""
    p = recovery_target_warp(pred, u_lab, padding_mode)
    terms = {
        "dist": distance_loss(p, u_lab, dist_eps),
        "ang": angle_loss(p, u_lab),
        "reg": regularisation_loss(pred, detj_weight=detj_weight, true_negdetj_weight=true_negdetj_weight),
    }
    terms["loss"] = w_dist * terms["dist"] + w_ang * terms["ang"] + w_reg * terms["reg"]
    return terms

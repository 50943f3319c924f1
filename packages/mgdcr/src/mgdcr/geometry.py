"""World-space geometry of the dense SAX grid and the LAX planes (spec §6, checklist D).

Conventions: volumes are ``(D, H, W)`` arrays whose 4×4 affine maps the index ``(d, h, w, 1)`` to world mm
(slice first, like ``medsynth_core.phantoms.CardiacPhantom.sax_affine``); a LAX plane's affine maps
``(r, c, 0, 1)`` to world mm, its third column being the plane normal. Sampling is trilinear at voxel
centres (``grid_sample(align_corners=True)``); points outside the volume are 0 and masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class DenseGrid:
    """Dense SAX grid: K−1 new slices in every gap, D = K(n−1)+1; dense slice mK is acquired slice m."""

    sax_affine: np.ndarray  # (4, 4), index (s, h, w) of the acquired stack
    n_slices: int
    K: int
    hw: tuple[int, int]

    @property
    def D(self) -> int:
        return self.K * (self.n_slices - 1) + 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.D, *self.hw)

    @property
    def affine(self) -> np.ndarray:
        a = np.asarray(self.sax_affine, dtype=np.float64).copy()
        a[:3, 0] = a[:3, 0] / self.K
        return a

    @property
    def slice_spacing(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))


@dataclass(frozen=True)
class LaxPlane:
    """One LAX view: image ``(H, W)``, affine of ``(r, c, 0)``, optional ROI mask ``(H, W)``."""

    image: np.ndarray
    affine: np.ndarray
    name: str = "lax"
    roi: np.ndarray | None = None

    def __post_init__(self) -> None:
        img = np.asarray(self.image)
        if img.ndim != 2:
            raise ValueError(f"LAX view '{self.name}': image must be 2D (H, W), got shape {img.shape}")
        if np.asarray(self.affine).shape != (4, 4):
            raise ValueError(f"LAX view '{self.name}': affine must be 4x4")
        if not np.all(np.isfinite(img)):
            raise ValueError(f"LAX view '{self.name}': image contains NaN/Inf")
        if self.roi is not None and np.asarray(self.roi).shape != img.shape:
            raise ValueError(
                f"LAX view '{self.name}': roi shape {np.asarray(self.roi).shape} != image {img.shape}"
            )


def plane_voxel_coords(grid_affine: np.ndarray, plane_affine: np.ndarray, plane_shape) -> np.ndarray:
    """Voxel coordinates ``(Hp, Wp, 3)`` (d, h, w) of every plane pixel centre, float64."""
    hp, wp = int(plane_shape[0]), int(plane_shape[1])
    r, c = np.meshgrid(np.arange(hp, dtype=np.float64), np.arange(wp, dtype=np.float64), indexing="ij")
    idx = np.stack([r, c, np.zeros_like(r), np.ones_like(r)], -1)
    m = np.linalg.solve(np.asarray(grid_affine, np.float64), np.asarray(plane_affine, np.float64))
    return (idx @ m.T)[..., :3]


def _inside(coords: np.ndarray, shape, tol: float = 1e-6) -> np.ndarray:
    ok = np.ones(coords.shape[:-1], dtype=bool)
    for a, n in enumerate(shape):
        ok &= (coords[..., a] >= -tol) & (coords[..., a] <= n - 1 + tol)
    return ok


def sample_at(volume: torch.Tensor, coords: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Trilinear values of ``volume`` (``(D,H,W)`` or ``(C,D,H,W)``) at voxel coordinates ``(..., 3)``.

    Returns ``(values (..., ) or (C, ...), mask (...))``; outside points are 0 with mask 0.
    """
    squeeze = volume.ndim == 3
    v = volume[None] if squeeze else volume
    shape = v.shape[1:]
    cnp = coords.detach().cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
    mask = torch.from_numpy(_inside(cnp, shape)).to(v.device)
    c = torch.as_tensor(cnp, dtype=v.dtype, device=v.device)
    norm = []
    for a, n in enumerate(shape):  # grid_sample wants (x, y, z) = (w, h, d), align_corners=True
        norm.append(c[..., a] * (2.0 / (n - 1)) - 1.0 if n > 1 else torch.zeros_like(c[..., a]))
    g = torch.stack(norm[::-1], -1).reshape(1, 1, 1, -1, 3)
    out = F.grid_sample(v[None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape(v.shape[0], *cnp.shape[:-1]) * mask.to(v.dtype)
    return (out[0] if squeeze else out), mask


def sample_plane(
    volume: torch.Tensor, grid_affine: np.ndarray, plane_affine: np.ndarray, plane_shape
) -> tuple[torch.Tensor, torch.Tensor]:
    """A V: pull the dense volume at every LAX pixel's world point (spec §6). Differentiable in V."""
    coords = plane_voxel_coords(grid_affine, plane_affine, plane_shape)
    return sample_at(volume, coords)


def plane_adjoint(
    y: torch.Tensor, grid_affine: np.ndarray, plane_affine: np.ndarray, grid_shape
) -> torch.Tensor:
    """Aᵀ y by explicit trilinear splatting with ``index_add_`` (the transpose of :func:`sample_plane`)."""
    coords = plane_voxel_coords(grid_affine, plane_affine, y.shape[-2:])
    shape = tuple(int(s) for s in grid_shape)
    inside = torch.from_numpy(_inside(coords, shape).reshape(-1))
    c = torch.from_numpy(coords.reshape(-1, 3)).to(y.dtype)
    vals = y.reshape(-1) * inside.to(y.dtype)
    out = torch.zeros(int(np.prod(shape)), dtype=y.dtype)
    base = torch.floor(c).long()
    frac = c - base
    strides = (shape[1] * shape[2], shape[2], 1)
    for corner in range(8):
        offs = [(corner >> a) & 1 for a in range(3)]
        w = torch.ones_like(vals)
        flat = torch.zeros_like(base[:, 0])
        valid = inside.clone()
        for a in range(3):
            idx = base[:, a] + offs[a]
            w = w * (frac[:, a] if offs[a] else 1 - frac[:, a])
            valid &= (idx >= 0) & (idx < shape[a])
            flat = flat + idx.clamp(0, shape[a] - 1) * strides[a]
        out.index_add_(0, flat, vals * w * valid.to(y.dtype))
    return out.reshape(shape)


def grid_world_points(grid_affine: np.ndarray, grid_shape) -> np.ndarray:
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in grid_shape], indexing="ij"), -1)
    return idx @ np.asarray(grid_affine, np.float64)[:3, :3].T + np.asarray(grid_affine, np.float64)[:3, 3]


def plane_to_grid(
    planes: list[LaxPlane], grid_affine: np.ndarray, grid_shape, half_thickness: float
) -> tuple[np.ndarray, np.ndarray]:
    """Fork-style volume-space target (spec §2, §6): every dense voxel within ``half_thickness`` mm of a LAX
    plane takes the plane's bilinear intensity at its orthogonal projection. Returns ``(G, M)`` ``(D,H,W)``;
    voxels hit by several planes get their mean. A plane's ROI (if given) restricts M (the fork's heart ROI).
    """
    pts = grid_world_points(grid_affine, grid_shape)
    acc = np.zeros(tuple(grid_shape), np.float64)
    cnt = np.zeros(tuple(grid_shape), np.float64)
    for p in planes:
        a = np.asarray(p.affine, np.float64)
        q = np.linalg.solve(a, np.concatenate([pts, np.ones(pts.shape[:-1] + (1,))], -1).reshape(-1, 4).T).T
        q = q.reshape(*pts.shape[:-1], 4)
        dist = np.abs(q[..., 2]) * np.linalg.norm(a[:3, 2])
        img = torch.from_numpy(np.asarray(p.image, np.float64))
        rc = np.concatenate([q[..., :2], np.zeros(q.shape[:-1] + (1,))], -1)  # (r, c, 0)
        vals, inside = sample_at(img[None], rc[..., [2, 0, 1]])
        hit = (dist <= half_thickness + 1e-9) & inside.numpy()
        if p.roi is not None:
            roi, _ = sample_at(torch.from_numpy(np.asarray(p.roi, np.float64))[None], rc[..., [2, 0, 1]])
            hit &= roi.numpy() > 0.5
        acc[hit] += vals.numpy()[hit]
        cnt[hit] += 1
    m = (cnt > 0).astype(np.float64)
    g = np.where(cnt > 0, acc / np.maximum(cnt, 1), 0.0)
    return g, m


def dhw_to_ijk_affine(affine_dhw: np.ndarray) -> np.ndarray:
    """Affine of a ``(d,h,w)``-indexed array → NIfTI ``(i,j,k) = (w,h,d)`` affine (``MedicalImage.from_dhw``)."""
    a = np.asarray(affine_dhw, np.float64).copy()
    a[:3, :3] = a[:3, [2, 1, 0]]
    return a


def ijk_to_dhw_affine(affine_ijk: np.ndarray) -> np.ndarray:
    return dhw_to_ijk_affine(affine_ijk)

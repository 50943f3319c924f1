"""Degraded-input simulators for the ControlNet tasks (spec §4/§5; the exact official pipelines are unknown,
spec §9): thick-slice super-resolution, sparse-view / limited-angle parallel-beam CT with filtered back-projection,
and Cartesian k-space undersampling (zero-filled inverse FFT).

Volumes are ``(B, C, D, H, W)`` with intensities in [-1, 1]; D is the slice axis and CT slices are (H, W).
Every function returns a tensor of the input shape on the input device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medsynth_core.phantoms import thick_slices

__all__ = [
    "TASKS",
    "ParallelBeamProjector",
    "degrade",
    "fbp",
    "kspace_undersample",
    "sparse_view_ct",
    "thick_slice",
]

TASKS = ("thick_slice", "sparse_view_ct", "limited_angle_ct", "kspace")


def _check(vol: torch.Tensor, name: str) -> None:
    if vol.ndim != 5:
        raise ValueError(f"{name} expects a volume (B, C, D, H, W), got shape {tuple(vol.shape)}")
    if not torch.isfinite(vol).all():
        raise ValueError(f"{name}: the volume contains NaN/Inf")


def thick_slice(vol: torch.Tensor, factor: int, axis: int = 2, mode: str = "trilinear") -> torch.Tensor:
    """Simulate thick slices: average groups of ``factor`` slices along ``axis`` (slice profile = box), then
    interpolate back to the original grid (``"trilinear"`` along that axis, or ``"nearest"`` = replicate)."""
    _check(vol, "thick_slice")
    if factor < 1:
        raise ValueError(f"thick-slice factor must be >= 1, got {factor}")
    if factor == 1:
        return vol.clone()
    axis = axis % 5
    if axis < 2:
        raise ValueError("thick_slice axis must be a spatial axis (2, 3 or 4)")
    n = vol.shape[axis]
    if n % factor:
        raise ValueError(
            f"volume size {n} along axis {axis} is not a multiple of the thick-slice factor {factor}"
        )
    thick = thick_slices(vol, factor, axis=axis)  # box slice profile: block means
    if mode == "nearest":
        return thick.repeat_interleave(factor, dim=axis)
    if mode != "trilinear":
        raise ValueError(f"mode must be 'trilinear' or 'nearest', got {mode!r}")
    return F.interpolate(thick, size=vol.shape[2:], mode="trilinear", align_corners=False)


def _rotation_grids(angles: torch.Tensor, size: int, inverse: bool = False) -> torch.Tensor:
    """Sampling grids (A, size, size, 2) rotating a square image by each angle about its centre."""
    c, s = torch.cos(angles), torch.sin(angles)
    if inverse:
        s = -s
    theta = torch.stack(
        [torch.stack([c, -s, torch.zeros_like(c)], -1), torch.stack([s, c, torch.zeros_like(c)], -1)], dim=1
    )  # (A, 2, 3)
    return F.affine_grid(theta, [angles.shape[0], 1, size, size], align_corners=False)


class ParallelBeamProjector:
    """Parallel-beam X-ray transform of square (H = W = n) slices by rotate-and-sum (bilinear interpolation).

    ``forward(img)`` maps (N, n, n) slices to sinograms (N, A, n) for the angles θ (radians); the ray for angle θ
    and detector bin u integrates the image along the rotated row direction. ``backproject`` is the adjoint-like
    smearing (rotate back and sum), used by :func:`fbp`. Angles are processed in chunks to bound memory.
    """

    def __init__(self, angles: torch.Tensor | Sequence[float], size: int, chunk: int = 32):
        self.angles = torch.as_tensor(angles, dtype=torch.float32).reshape(-1)
        if self.angles.numel() < 1:
            raise ValueError("the projector needs at least one angle")
        self.size, self.chunk = int(size), int(chunk)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        n_img, h, w = img.shape
        if h != self.size or w != self.size:
            raise ValueError(f"projector built for {self.size}² slices, got {h}×{w}")
        out = []
        for a in self.angles.split(self.chunk):
            grid = _rotation_grids(a.to(img.device), self.size).to(img.dtype)  # (A, n, n, 2)
            rot = F.grid_sample(
                img[:, None].expand(n_img, a.numel(), h, w).reshape(-1, 1, h, w),
                grid.repeat(n_img, 1, 1, 1),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
            out.append(rot.reshape(n_img, a.numel(), h, w).sum(dim=2))  # integrate along rows → (N, A, n)
        return torch.cat(out, dim=1)

    __call__ = forward

    def backproject(self, sino: torch.Tensor) -> torch.Tensor:
        n_img, n_ang, n_det = sino.shape
        out = torch.zeros(n_img, self.size, self.size, device=sino.device, dtype=sino.dtype)
        for idx, a in zip(torch.arange(n_ang).split(self.chunk), self.angles.split(self.chunk), strict=True):
            smear = sino[:, idx, None, :].expand(n_img, a.numel(), self.size, n_det)
            grid = _rotation_grids(a.to(sino.device), self.size, inverse=True).to(sino.dtype)
            rot = F.grid_sample(
                smear.reshape(-1, 1, self.size, n_det),
                grid.repeat(n_img, 1, 1, 1),
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
            out += rot.reshape(n_img, a.numel(), self.size, self.size).sum(dim=1)
        return out


def _ramp_filter(n_det: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Ram-Lak filter built from its spatial kernel (no DC bias), zero-padded to ≥ 2·n_det (a power of two)."""
    pad = max(64, 2 ** math.ceil(math.log2(2 * n_det)))
    k = torch.zeros(pad, dtype=torch.float64)
    k[0] = 0.25
    odd = torch.cat([torch.arange(1, pad // 2 + 1, 2), torch.arange(pad // 2 - 1, 0, -2)]).double()
    k[1::2] = -1.0 / (math.pi * odd) ** 2
    return (2 * torch.fft.fft(k).real).to(device=device, dtype=dtype), pad


def fbp(sino: torch.Tensor, projector: ParallelBeamProjector) -> torch.Tensor:
    """Filtered back-projection of (N, A, n) sinograms over [0, π) → (N, n, n) slices: Ram-Lak filter along the
    detector, back-projection, weight π/(2A)."""
    n_img, n_ang, n_det = sino.shape
    filt, pad = _ramp_filter(n_det, sino.device, sino.dtype)
    spec = torch.fft.fft(F.pad(sino, (0, pad - n_det)), dim=-1) * filt
    filtered = torch.fft.ifft(spec, dim=-1).real[..., :n_det]
    return projector.backproject(filtered) * (math.pi / (2 * n_ang))


def _to_square(vol: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    h, w = vol.shape[-2:]
    n = max(h, w)
    ph, pw = n - h, n - w
    pads = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return F.pad(vol, pads), pads


def sparse_view_ct(
    vol: torch.Tensor,
    n_views: int = 60,
    arc_degrees: float = 180.0,
    full_views: int | None = None,
    clamp: bool = True,
) -> torch.Tensor:
    """Sparse-view (``n_views`` over ``arc_degrees``) or limited-angle (``arc_degrees`` < 180) CT: intensities
    in [-1, 1] → attenuation in [0, 1], parallel-beam projection of every axial slice, FBP, back to [-1, 1].

    The back-projection weight is that of a full scan sampled at the same angular step (``π/(2·A_full)``,
    A_full = ``full_views`` or n_views·180/arc), so a limited arc is not artificially brightened.
    """
    _check(vol, "sparse_view_ct")
    if n_views < 1 or not 0 < arc_degrees <= 180:
        raise ValueError(f"need n_views >= 1 and 0 < arc_degrees <= 180, got {n_views}, {arc_degrees}")
    b, c, d, h, w = vol.shape
    sq, (pl, pr, pt, pb) = _to_square(vol)
    n = sq.shape[-1]
    mu = ((sq + 1) / 2).reshape(-1, n, n)
    angles = torch.arange(n_views, dtype=torch.float64) * (math.radians(arc_degrees) / n_views)
    proj = ParallelBeamProjector(angles.float(), n)
    rec = fbp(proj(mu), proj)
    a_full = full_views if full_views is not None else n_views * 180.0 / arc_degrees
    rec = rec * (n_views / a_full)
    rec = rec.reshape(b, c, d, n, n)[..., pt : n - pb, pl : n - pr]
    out = rec * 2 - 1
    return out.clamp(-1, 1) if clamp else out


def kspace_undersample(
    vol: torch.Tensor, acceleration: int = 4, center_fraction: float = 0.08, axis: int = -1, seed: int = 0
) -> torch.Tensor:
    """Cartesian undersampling of each 2D (H, W) slice: keep ``center_fraction`` of the central phase-encoding lines
    along ``axis`` (-1 = W or -2 = H) plus random lines up to 1/``acceleration``; zero-filled inverse FFT magnitude
    (intensities mapped to [0, 1] and back). The mask is drawn from ``seed`` (same for the whole volume)."""
    _check(vol, "kspace_undersample")
    if axis not in (-1, -2):
        raise ValueError("kspace axis must be -1 (W) or -2 (H)")
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    n = vol.shape[axis]
    g = torch.Generator().manual_seed(int(seed))
    n_center = max(1, round(n * center_fraction))
    mask = torch.zeros(n, dtype=torch.bool)
    start = (n - n_center) // 2
    mask[start : start + n_center] = True
    n_keep = max(n_center, round(n / acceleration))
    rest = (~mask).nonzero().reshape(-1)
    extra = rest[torch.randperm(rest.numel(), generator=g)[: max(0, n_keep - n_center)]]
    mask[extra] = True
    mask = torch.fft.ifftshift(mask)  # centre lines ↔ low frequencies of the unshifted FFT
    shape = [1] * vol.ndim
    shape[axis] = n
    img = (vol + 1) / 2
    k = torch.fft.fft2(img.to(torch.float32), dim=(-2, -1)) * mask.reshape(shape).to(vol.device)
    rec = torch.fft.ifft2(k, dim=(-2, -1)).abs().to(vol.dtype)
    return (rec * 2 - 1).clamp(-1, 1)


def degrade(vol: torch.Tensor, task: str, **params) -> torch.Tensor:
    """Dispatch: ``thick_slice`` (factor, axis, mode), ``sparse_view_ct`` (n_views, arc_degrees),
    ``limited_angle_ct`` (arc_degrees, n_views), ``kspace`` (acceleration, center_fraction, axis, seed)."""
    if task == "thick_slice":
        return thick_slice(vol, **{"factor": 4, **params})
    if task == "sparse_view_ct":
        return sparse_view_ct(vol, **{"n_views": 60, **params})
    if task == "limited_angle_ct":
        return sparse_view_ct(vol, **{"arc_degrees": 90.0, "n_views": 90, **params})
    if task == "kspace":
        return kspace_undersample(vol, **params)
    raise ValueError(f"unknown degradation task {task!r}; choose one of {TASKS}")

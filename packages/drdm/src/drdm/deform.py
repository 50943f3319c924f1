"""Deformation algebra and the forward deformation diffusion of DRDM (spec sections 1 and 2).

Unit convention (spec section 1): a displacement field ``u`` has shape ``[B, nd, *S^nd]``; channel ``i`` is the
displacement along tensor spatial axis ``i`` (H, W or D, H, W) as a **fraction of the image side S** (the first
spatial size), so ``S * u`` is in voxels. ``warp(I, u)(x) = I(x + S u(x))`` with ``align_corners=True``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PAD_MODES = ("zeros", "border", "reflection")
INTERP_MODES = ("bilinear", "nearest", "bicubic")


def reference_grid(shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Integer voxel index grid ``[1, nd, *shape]`` (``ij`` indexing)."""
    axes = [torch.arange(int(s), device=device) for s in shape]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), 0).unsqueeze(0)


@functools.lru_cache(maxsize=32)
def _grid_constants(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(reference grid, per-axis scale, half extent) of ``_grid``, built once per shape and device (issue 19:
    the sampler warps ~400 times per sample; rebuilding them each time cost as much as the warps at 64²).
    Read-only: ``_grid`` never writes into them."""
    nd = len(shape)
    ref = reference_grid(shape, device)
    # the official code scales every axis by the first spatial size (square / cubic images, spec section 1)
    scale = torch.full([1, nd] + [1] * nd, float(shape[0]), dtype=torch.float32, device=device)
    half = torch.tensor([(s - 1) / 2.0 for s in shape], device=device).reshape([1] + [1] * nd + [nd])
    return ref, scale, half


def _grid(u: torch.Tensor) -> torch.Tensor:
    """Sampling grid of ``grid_sample`` for the displacement ``u`` (spec section 1)."""
    nd = u.shape[1]
    shape = tuple(int(s) for s in u.shape[2:])
    if len(shape) != nd or nd not in (2, 3):
        raise ValueError(
            f"a displacement field must be [B, nd, *spatial] with nd in (2, 3), got {tuple(u.shape)}"
        )
    ref, scale, half = _grid_constants(shape, u.device)
    coords = (u * scale + ref).permute([0, *range(2, 2 + nd), 1])
    return torch.flip(coords / half - 1, dims=[-1])


def warp(
    x: torch.Tensor, u: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """``W(x, u)``: resample ``x`` ``[B, C, *S]`` at ``x + S u``. ``mode`` bilinear (trilinear in 3D),
    nearest or bicubic (2D only); ``padding_mode`` zeros, border or reflection."""
    if mode not in INTERP_MODES:
        raise ValueError(f"interpolation mode must be one of {INTERP_MODES}, got {mode!r}")
    if padding_mode not in PAD_MODES:
        raise ValueError(f"padding mode must be one of {PAD_MODES}, got {padding_mode!r}")
    if x.shape[2:] != u.shape[2:] or x.shape[0] != u.shape[0]:
        raise ValueError(
            f"image {tuple(x.shape)} and field {tuple(u.shape)} must share batch and spatial sizes"
        )
    if mode == "bicubic" and u.shape[1] == 3:
        raise ValueError("bicubic interpolation is 2D only; use bilinear (trilinear) for 3D")
    return F.grid_sample(x, _grid(u).to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def compose(
    u: torch.Tensor, v: torch.Tensor, padding_mode: str = "border", mode: str = "bilinear"
) -> torch.Tensor:
    """``u ⊕ v = v + W(u, v)``: ``W(W(I, u), v) = W(I, u ⊕ v)`` ("u first, then v"; spec section 1)."""
    return v + warp(u, v, mode=mode, padding_mode=padding_mode)


def voxel_displacement(u: torch.Tensor) -> torch.Tensor:
    """Displacement in voxels ``S u``."""
    return u * float(u.shape[2])


# --------------------------------------------------------------------------------- forward diffusion
def step_counts(t: torch.Tensor, max_img_steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec section 2 schedule: ``n_img = clamp(floor(2 t^1.3 / 3), 1, 200)``, ``n_lab = floor(t^0.6)``.

    Computed with the same float32 tensor ops as the official code so the integer counts match."""
    t = torch.as_tensor(t)
    if t.dtype.is_floating_point:
        raise ValueError("noise levels t must be integers")
    n_img = torch.floor_divide(2 * torch.pow(t, 1.3), 3).int().clamp(min=1, max=max_img_steps)
    n_lab = torch.floor_divide(torch.pow(t, 0.6), 1).int()
    return n_img, n_lab


def _interp_mode(nd: int) -> str:
    return "bilinear" if nd == 2 else "trilinear"


class DeformationDiffusion:
    """The forward process of spec section 2 (official ``DeformDDPM._random_ddf_generate``).

    ``forward(x0, t)`` returns ``(I_t, U_lab, U_img)``. Random numbers are drawn from the default CPU
    generator (or ``generator``) in the official order: 4 (K) ``randn`` for the velocity ``v``, then K for
    the perturbation ``n``.
    """

    def __init__(
        self,
        ndims: int = 2,
        img_size: int = 256,
        ctl_sz: int = 64,
        v_scale: float = 4e-5,
        noise_ratio: float = 0.08,
        img_pad_mode: str = "zeros",
        ddf_pad_mode: str = "border",
        resample_mode: str = "bilinear",
        geometric_lift: bool = False,
        max_img_steps: int = 200,
        crop_rate: int = 2,
    ):
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        if ctl_sz < 8 or ctl_sz & (ctl_sz - 1):
            raise ValueError(f"ctl_sz must be a power of two >= 8, got {ctl_sz}")
        self.ndims = ndims
        self.img_size = int(img_size)
        self.ctl_sz = int(ctl_sz)
        self.v_scale = float(v_scale)
        self.noise_ratio = float(noise_ratio)
        self.img_pad_mode = img_pad_mode
        self.ddf_pad_mode = ddf_pad_mode
        self.resample_mode = resample_mode
        self.geometric_lift = bool(geometric_lift)
        self.max_img_steps = int(max_img_steps)
        self.crop_rate = int(crop_rate)
        # K = min(5, log2 C - 2) scales C, C/2, ... (spec section 2)
        self.scales = [self.ctl_sz // 2**i for i in range(min(5, int(math.log2(self.ctl_sz)) - 2))]

    # -- velocity fields on the control grid
    def velocity(self, batch: int, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """``v = sum_c Up_{c->C}[(C/c) sigma eps_c]`` on the C grid (spec section 2), float32 on CPU."""
        nd, c_full = self.ndims, self.ctl_sz
        v: torch.Tensor | int = 0
        for c in self.scales:
            comp = torch.randn([batch, nd] + [c] * nd, generator=generator) * sigma
            comp = F.interpolate(comp * c_full / c, [c_full] * nd, mode=_interp_mode(nd), align_corners=False)
            v = v + comp
        return v  # type: ignore[return-value]

    def lift(self, psi: torch.Tensor) -> torch.Tensor:
        """Control-grid field -> image field: upsample to 2S and crop the centre (spec section 2, Q1)."""
        s = self.img_size
        factor = float(self.crop_rate) if self.geometric_lift else None
        # faithful (Q1): multiply by S/C, which equals crop_rate only for S = 128 with C = 64
        scaled = psi * factor if factor is not None else psi * s / self.ctl_sz
        up = F.interpolate(scaled, [s * self.crop_rate] * self.ndims, mode=_interp_mode(self.ndims))
        sl = slice(s // 2, s * 3 // 2)
        return up[(Ellipsis,) + (sl,) * self.ndims]

    def sample_fields(
        self,
        t: torch.Tensor,
        batch: int | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U_img, U_lab)`` for levels ``t`` ``[B]``."""
        t = torch.as_tensor(t).reshape(-1).cpu()
        b = int(t.numel()) if batch is None else int(batch)
        if t.numel() == 1 and b > 1:
            t = t.expand(b)
        n_img, n_lab = step_counts(t, self.max_img_steps)
        n_img = n_img.reshape([b] + [1] * (self.ndims + 1)).to(device)
        n_lab = n_lab.reshape([b] + [1] * (self.ndims + 1)).to(device)
        v = self.velocity(b, self.v_scale, generator).to(device)
        if self.noise_ratio == 0:
            v_img = v
        else:
            noise = self.velocity(b, self.v_scale * self.noise_ratio, generator).to(device)
            v_img = compose(noise, v, padding_mode=self.ddf_pad_mode)  # v' = n ⊕_C v = v + W_C(n, v)
        shape = [b, self.ndims] + [self.ctl_sz] * self.ndims
        psi_img = torch.zeros(shape, device=device)
        psi_lab = torch.zeros(shape, device=device)
        # one stationary velocity, explicit Euler by repeated composition, masked per sample. The image and
        # label chains are composed in one batch of 2B (grid_sample treats samples independently, so this
        # is bit-identical to two calls; issue 19: half the calls of the official loop)
        psi = torch.cat([psi_img, psi_lab])
        for j in range(int(n_img.max().item())):
            step = torch.cat([v_img * (n_img > j).int(), v * (n_lab > j).int()])
            psi = compose(psi, step, padding_mode=self.ddf_pad_mode)
        psi_img, psi_lab = psi[:b], psi[b:]
        return self.lift(psi_img), self.lift(psi_lab)

    def forward(
        self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(I_t, U_lab, U_img)`` with ``I_t = W(x0, U_img)`` (spec section 2 output order)."""
        if x0.ndim != self.ndims + 2:
            raise ValueError(f"expected x0 of shape [B, C, *S^{self.ndims}], got {tuple(x0.shape)}")
        if any(int(s) != self.img_size for s in x0.shape[2:]):
            raise ValueError(
                f"image of spatial size {tuple(x0.shape[2:])} does not match img_size={self.img_size}; resize it"
            )
        u_img, u_lab = self.sample_fields(t, x0.shape[0], x0.device, generator)
        x_t = warp(x0, u_img.to(x0.dtype), mode=self.resample_mode, padding_mode=self.img_pad_mode)
        return x_t, u_lab, u_img

    __call__ = forward

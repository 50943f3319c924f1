"""Inverse optimisation (spec §3): encode SAX slices, seed the dense grid, optimise (x_T, z_sem) of every dense
slice through the differentiable DDIM decoder against LAX consistency + latent pull + through-plane
smoothness, and write the dense volume; :func:`load_prior` loads a trained prior (never importing training)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from medsynth_core import checkpoint as C

from .config import Config, InverseConfig
from .diffusion import GaussianDiffusion
from .geometry import DenseGrid, LaxPlane, plane_to_grid, sample_plane
from .losses import latent_loss, lax_volume_loss, smoothness_loss
from .model import DiffAE

log = logging.getLogger("mgdcr")


PRIOR_KIND = "mgdcr"  # checkpoint kind of the DiffAE prior (and its latent DDIM)


def load_prior(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[DiffAE, Config]:
    """Model (EMA weights by default, spec §1.2) and its config from a medsynth checkpoint."""
    from medsynth_core.config import config_from_dict

    ckpt = C.load_checkpoint(path, kind=PRIOR_KIND)
    cfg = config_from_dict(Config, ckpt.get("config") or {}, source=f"{path} [config]")
    model = DiffAE(cfg.model)
    emas = ckpt.get("emas") or {}
    if use_ema and "ema" in emas:
        C.load_module_state(model, emas["ema"]["module"], source=f"{path} [ema]")
    else:
        C.load_module_state(model, ckpt["models"]["model"], source=f"{path} [model]")
    return model.to(device).eval(), cfg



# --------------------------------------------------------------------------------------------- seeds
def slerp(a: torch.Tensor, b: torch.Tensor, alpha: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of flattened vectors; falls back to lerp when θ ≈ 0 (spec §3.2, C2)."""
    af, bf = a.reshape(-1), b.reshape(-1)
    cos = torch.dot(af, bf) / (af.norm() * bf.norm() + eps)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(torch.sin(theta)) < eps:
        return (1 - alpha) * a + alpha * b
    s = torch.sin(theta)
    return (torch.sin((1 - alpha) * theta) / s) * a + (torch.sin(alpha * theta) / s) * b


def seed_fractions(K: int, mode: str = "grid") -> list[float]:
    """Interpolation fractions of the K entries of one gap (the first is the left acquired slice).

    ``grid``: k/K, k = 0…K−1 (correct). ``fork``: 0, 0, 1/(K−1), …, (K−2)/(K−1) (ex8 L55-80 bug: the left
    slice is repeated and the positions are misaligned with the grid)."""
    if mode == "grid":
        return [k / K for k in range(K)]
    if mode == "fork":
        return [0.0] + [j / (K - 1) for j in range(K - 1)] if K > 1 else [0.0]
    raise ValueError(f"interp_positions must be 'grid' or 'fork', got {mode!r}")


def make_seeds(
    xt: torch.Tensor, z: torch.Tensor, K: int, mode: str = "grid"
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T by slerp, z by lerp → ``(D, ...)`` with D = K(n−1)+1 (spec §3.2, C1)."""
    n = xt.shape[0]
    fr = seed_fractions(K, mode)
    xs, zs = [], []
    for m in range(n - 1):
        for a in fr:
            xs.append(xt[m] if a == 0 else slerp(xt[m], xt[m + 1], a))
            zs.append((1 - a) * z[m] + a * z[m + 1])
    xs.append(xt[n - 1])
    zs.append(z[n - 1])
    return torch.stack(xs), torch.stack(zs)


# --------------------------------------------------------------------------------------------- priors
class Prior(Protocol):
    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def decode(self, xt: torch.Tensor, z: torch.Tensor, grad: bool = False) -> torch.Tensor: ...


class DiffAEPrior:
    """Images in [0,1] ``(B,H,W)`` ↔ (x_T, z_sem) through the (EMA) DiffAE; net space is [-1,1], H-flipped
    when ``flip_h`` (UKB orientation, spec §2)."""

    def __init__(
        self,
        model: DiffAE,
        diffusion: GaussianDiffusion,
        encode_steps: int,
        decode_steps: int,
        checkpoint: bool = False,
        flip_h: bool = False,
        chunk: int = 64,
    ):
        self.model = model.eval().requires_grad_(False)
        self.enc = diffusion.sampler(encode_steps)
        self.dec = diffusion.sampler(decode_steps)
        self.checkpoint = checkpoint
        self.flip_h = flip_h
        self.chunk = chunk

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to_net(self, x01: torch.Tensor) -> torch.Tensor:
        x = x01[:, None] * 2 - 1
        return x.flip(-2) if self.flip_h else x

    def from_net(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flip(-2) if self.flip_h else x
        return (x[:, 0] + 1) / 2

    @torch.no_grad()
    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.to_net(x01)
        z = self.model.encode(x)
        return self.enc.encode(self.model.eps_fn(z), x), z

    def decode(self, xt: torch.Tensor, z: torch.Tensor, grad: bool = False) -> torch.Tensor:
        if grad:
            return self.from_net(self.dec.decode(self.model.eps_fn(z, self.checkpoint), xt, grad=True))
        with torch.no_grad():
            outs = [
                self.dec.decode(self.model.eps_fn(z[i : i + self.chunk]), xt[i : i + self.chunk])
                for i in range(0, xt.shape[0], self.chunk)
            ]
        return self.from_net(torch.cat(outs))


class IdentityPrior:
    """Model-free plumbing check (E2): the 'latent' is the image itself."""

    def encode(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x01[:, None].clone(), torch.zeros(x01.shape[0], 1, dtype=x01.dtype)

    def decode(self, xt: torch.Tensor, z: torch.Tensor, grad: bool = False) -> torch.Tensor:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return xt[:, 0] + 0 * z.sum()


# --------------------------------------------------------------------------------------------- baselines
def linear_interp_z(sax: np.ndarray, K: int) -> np.ndarray:
    """Linear-in-z interpolation of ``(n,H,W)`` onto the dense grid ``(K(n−1)+1,H,W)``."""
    sax = np.asarray(sax, np.float64)
    out = [(1 - k / K) * sax[m] + (k / K) * sax[m + 1] for m in range(sax.shape[0] - 1) for k in range(K)]
    return np.stack(out + [sax[-1]])


def nearest_interp_z(sax: np.ndarray, K: int) -> np.ndarray:
    sax = np.asarray(sax, np.float64)
    out = [sax[m] if k < K / 2 else sax[m + 1] for m in range(sax.shape[0] - 1) for k in range(K)]
    return np.stack(out + [sax[-1]])


def harmonise(g: np.ndarray, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Global moment match inside the ROI R = {M>0}: G[R] ← (G[R]−μ_G)/σ_G·σ_S + μ_S (spec §3.3)."""
    r = m > 0
    if r.sum() < 2:
        return g
    out = g.copy()
    sd = g[r].std()
    out[r] = (g[r] - g[r].mean()) / (sd if sd > 0 else 1.0) * s[r].std() + s[r].mean()
    return out


def harmonise_reference(sax: np.ndarray, sax_raw: np.ndarray | None, cfg: InverseConfig) -> np.ndarray:
    """Reference volume S of the LAX moment match on the dense grid (spec §3.3). ``official`` (ex8 L236-240):
    the linear-in-z volume of the SAX frame before N4 and normalisation (``sax_raw``; ``sax`` when not given),
    clipped at its (NaN-aware) 99th percentile to [0, 1]. ``model``: the linear volume of ``sax``, the SAX
    slices as the model sees them (our normaliser: N4 + p98 of the 4D array)."""
    if cfg.harmonise_reference == "official":
        src = sax if sax_raw is None else sax_raw
        return percentile_normalise(linear_interp_z(np.asarray(src, np.float64), cfg.K), 99.0)
    if cfg.harmonise_reference == "model":
        return linear_interp_z(np.asarray(sax, np.float64), cfg.K)
    raise ValueError(
        f"inverse.harmonise_reference must be 'official' or 'model', got {cfg.harmonise_reference!r}"
    )


def kept_slices(frame01: np.ndarray, mode: str = "official") -> list[int]:
    """Indices of the SAX slices of one frame (``(Z,H,W)`` in [0,1]) that are encoded (spec §2, ex8 L178-182).

    ``official``: the fork drops slice i when ``max(2x−1) == 0`` on the [-1, 1] slice, so an all-zero slice
    (at −1) is kept; ``zero``: drop all-zero slices; ``none``: keep every slice."""
    x = np.asarray(frame01, np.float64)
    if mode == "official":
        return [i for i in range(x.shape[0]) if (x[i] * 2.0 - 1.0).max() != 0]
    if mode == "zero":
        return [i for i in range(x.shape[0]) if np.any(x[i])]
    if mode == "none":
        return list(range(x.shape[0]))
    raise ValueError(f"inverse.drop_empty must be 'official', 'zero' or 'none', got {mode!r}")


# ex10_middle_slice_delete.py L19-31 (spec §3.10): the held-out protocol's settings
EX10 = {"lambda_lax": 6.0, "lambda_smooth": 3.0, "lr": 1e-3, "n4": False, "freeze_ends": True}


# --------------------------------------------------------------------------------------------- reconstruct
@dataclass
class ReconResult:
    volume: np.ndarray  # (D,H,W) in [0,1]
    seeds: np.ndarray  # decoded seeds (pure DiffAE interpolation)
    affine: np.ndarray  # (4,4) (d,h,w) affine of the dense grid
    grid: DenseGrid
    history: list[dict[str, float]] = field(default_factory=list)
    targets: tuple[np.ndarray, np.ndarray] | None = None
    iterations: int = 0


def reconstruct(
    prior: Prior,
    sax: np.ndarray | torch.Tensor,
    sax_affine: np.ndarray,
    planes: list[LaxPlane],
    cfg: InverseConfig,
    targets: tuple[np.ndarray, np.ndarray] | None = None,
    dtype: torch.dtype = torch.float32,
    sax_raw: np.ndarray | None = None,
    reference: np.ndarray | None = None,
) -> ReconResult:
    """Core inverse optimisation on one frame.

    ``sax``: ``(n,H,W)`` acquired slices in [0,1] (``n >= 2``); ``sax_affine``: (s,h,w) affine; ``planes``: LAX
    views (used for the targets); ``targets``: precomputed volume-space (G, M) on the dense grid (fork data);
    ``sax_raw``: the same slices before N4 and normalisation, for ``harmonise_reference: official`` (default:
    ``sax``); ``reference``: a precomputed harmonisation reference on the dense grid (ex10: rows of the whole
    stack's). Runs on the prior's device; ``cfg.amp`` applies on CUDA only.
    """
    dev = torch.device(getattr(prior, "device", "cpu"))
    sax_t = torch.as_tensor(np.asarray(sax), dtype=dtype).to(dev)
    if sax_t.ndim != 3 or sax_t.shape[0] < 2:
        raise ValueError(f"SAX stack must be (n>=2, H, W), got shape {tuple(sax_t.shape)}")
    if not torch.isfinite(sax_t).all():
        raise ValueError("SAX stack contains NaN/Inf")
    n, h, w = sax_t.shape
    grid = DenseGrid(np.asarray(sax_affine, np.float64), n, cfg.K, (h, w))
    D = grid.D
    xt_acq, z_acq = prior.encode(sax_t)
    xt0, z0 = make_seeds(xt_acq, z_acq, cfg.K, cfg.interp_positions)
    xt0, z0 = xt0.detach(), z0.detach()
    seeds = prior.decode(xt0, z0, grad=False)

    plane_targets = []
    if cfg.lax_space == "volume" or targets is not None:
        if targets is None:
            ht = cfg.half_thickness if cfg.half_thickness is not None else grid.slice_spacing / 2
            g, m = plane_to_grid(planes, grid.affine, grid.shape, ht)
        else:
            g, m = (np.asarray(a, np.float64) for a in targets)
            if g.shape != grid.shape or m.shape != grid.shape:
                raise ValueError(
                    f"LAX target/mask shapes {g.shape}/{m.shape} do not match the dense grid "
                    f"{grid.shape} (D = K(n-1)+1 = {D})"
                )
        if cfg.harmonise:
            ref = harmonise_reference(sax, sax_raw, cfg) if reference is None else np.asarray(reference)
            if ref.shape != grid.shape:
                raise ValueError(f"harmonisation reference shape {ref.shape} != dense grid {grid.shape}")
            g = harmonise(g, m, ref)
        g_t, m_t = torch.as_tensor(g, dtype=dtype).to(dev), torch.as_tensor(m, dtype=dtype).to(dev)
    else:
        g_t = m_t = None
        for p in planes:
            y = torch.as_tensor(np.asarray(p.image, np.float64), dtype=dtype).to(dev)
            roi = (
                torch.ones_like(y)
                if p.roi is None
                else torch.as_tensor(np.asarray(p.roi) > 0, dtype=dtype).to(dev)
            )
            plane_targets.append((p, y, roi))
        g, m = None, None

    # frozen slices (ex10: the two ends; ``freeze_acquired``: every acquired slice) keep their seeds, so they
    # are decoded once (``seeds``) and only the free slices go through the differentiable decoder
    frozen = torch.zeros(D, dtype=torch.bool, device=dev)
    if cfg.freeze_ends:
        frozen[[0, -1]] = True
    if cfg.freeze_acquired:
        frozen[:: cfg.K] = True
    free = (~frozen).nonzero()[:, 0]
    fixed_x = seeds.to(dtype).detach()
    acq_idx = torch.arange(0, D, cfg.K, device=dev)
    xt = xt0[free].clone().requires_grad_(True)
    z = z0[free].clone().requires_grad_(True)
    xt0_f, z0_f = xt0[free], z0[free]
    opt = torch.optim.Adam([xt, z], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    # ex8 L295-330: fp16 autocast + GradScaler on CUDA; never on CPU (bit-identical CPU results)
    use_amp = cfg.amp != "off" and dev.type == "cuda"
    amp_dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if use_amp and cfg.amp == "fp16" else None
    best, bad = math.inf, 0
    history: list[dict[str, float]] = []
    it = 0
    for it in range(1, (cfg.iterations if len(free) else 0) + 1):
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
            loss, l_lax, l_lat, l_s = _objective(
                prior,
                xt,
                z,
                xt0_f,
                z0_f,
                fixed_x,
                free,
                frozen,
                g_t,
                m_t,
                plane_targets,
                grid,
                sax_t,
                acq_idx,
                cfg,
            )
        mean_loss = float(loss.detach()) / D
        history.append(
            {
                "iter": it,
                "loss": mean_loss,
                "lax": float(l_lax.detach().sum()),
                "lat": float(l_lat.detach().sum()),
                "smooth": float(l_s.detach().sum()),
            }
        )
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        with torch.no_grad():  # pull back towards the seeds (spec §3.7)
            xt.lerp_(xt0_f, cfg.pullback)  # = (1−α)v + α v0, exact when v = v0
            z.lerp_(z0_f, cfg.pullback)
        # early stop on the pre-update per-slice loss (spec §3.7)
        if best - mean_loss > cfg.early_stop_tol:
            best, bad = mean_loss, 0
        else:
            bad += 1
            if bad >= cfg.early_stop_patience:
                log.info("early stop at iteration %d (loss %.6g)", it, mean_loss)
                break
    # only the free slices changed: decode them; the frozen ones are the (deterministic) decoded seeds
    volume = fixed_x.clone()
    if len(free):
        volume[free] = prior.decode(xt.detach(), z.detach(), grad=False).to(dtype)
    return ReconResult(
        volume=volume.double().cpu().numpy().clip(0, 1),
        seeds=seeds.double().cpu().numpy().clip(0, 1),
        affine=grid.affine,
        grid=grid,
        history=history,
        targets=(g, m) if g is not None else None,
        iterations=it,
    )


def _objective(
    prior, xt, z, xt0_f, z0_f, fixed_x, free, frozen, g_t, m_t, plane_targets, grid, sax_t, acq_idx, cfg
):
    """Total loss of one iteration (spec §3.6) and its LAX, latent and smoothness parts."""
    x_free = prior.decode(xt, z, grad=True)
    x = fixed_x.index_copy(0, free, x_free.to(fixed_x.dtype)) if bool(frozen.any()) else x_free
    if g_t is not None:
        l_lax = lax_volume_loss(x, g_t, m_t, cfg.mask_target, cfg.mask_eps)
        l_lax_total = (cfg.lambda_lax * l_lax).sum()
    else:
        l_lax = torch.zeros((), dtype=fixed_x.dtype, device=fixed_x.device)
        for p, y, roi in plane_targets:
            ax, mk = sample_plane(x, grid.affine, p.affine, y.shape)
            mk = mk.to(fixed_x.dtype) * roi
            l_lax = l_lax + (mk * (ax - y) ** 2).sum() / (mk.sum() + cfg.mask_eps)
        l_lax_total = cfg.lambda_lax * l_lax
    l_lat = latent_loss(xt, z, xt0_f, z0_f)  # 0 for the frozen slices
    l_s = smoothness_loss(x)
    loss = l_lax_total + (cfg.lambda_lat * l_lat).sum() + (cfg.lambda_smooth * l_s).sum()
    if cfg.lambda_sax > 0:
        loss = loss + cfg.lambda_sax * ((x[acq_idx] - sax_t) ** 2).mean()
    return loss, l_lax, l_lat, l_s


# --------------------------------------------------------------------------------------------- files
def output_affine(
    sax_affine_dhw: np.ndarray, kept: list[int], n_orig: int, K: int, from_kept: bool = True
) -> np.ndarray:
    """Dense-volume (d,h,w) affine. ``from_kept`` (fix): origin at the first kept slice, z-spacing s_z/K.
    Fork (ex8 L436-442): original origin and spacing s_z·(Z_orig−1)/(D−1)."""
    a = np.asarray(sax_affine_dhw, np.float64).copy()
    D = K * (len(kept) - 1) + 1
    if from_kept:
        a[:3, 3] = a[:3, 3] + kept[0] * a[:3, 0]
        a[:3, 0] = a[:3, 0] / K
    else:
        a[:3, 0] = a[:3, 0] * (n_orig - 1) / (D - 1)
    return a


def percentile_normalise(x: np.ndarray, q: float, include_zeros: bool = True) -> np.ndarray:
    """Clip to [0, p_q] and divide by p_q (spec §2: p98 of the whole array, zeros included by default)."""
    vals = x if include_zeros else x[x > 0]
    p = float(np.nanpercentile(vals, q)) if vals.size else 0.0
    if p <= 0:
        return np.zeros_like(x, dtype=np.float64)
    return np.clip(np.asarray(x, np.float64), 0, p) / p


def n4_correct(x: np.ndarray) -> np.ndarray:
    """N4 bias-field correction with SimpleITK (spec §2/§3.3; the fork used ANTs)."""
    import SimpleITK as sitk

    arr = np.asarray(x, np.float32)
    squeeze = arr.ndim == 3 and arr.shape[0] == 1  # a single plane: correct it as a 2D image
    img = sitk.GetImageFromArray(arr[0] if squeeze else arr)
    mask = sitk.OtsuThreshold(img, 0, 1, 200)
    out = sitk.GetArrayFromImage(sitk.N4BiasFieldCorrectionImageFilter().Execute(img, mask)).astype(
        np.float64
    )
    return out[None] if squeeze else out


def save_panel(
    path: str | Path,
    sax: np.ndarray,
    planes: list[LaxPlane],
    volume: np.ndarray,
    seeds: np.ndarray | None = None,
) -> Path:
    """PNG panel: SAX input slices, LAX views, orthogonal views of the reconstruction (and seeds)."""
    from medsynth_core.viz import orthogonal_views, save_grid

    rows: list[list[Any]] = [list(np.asarray(sax)[: min(6, len(sax))])]
    titles: list[list[str]] = [[f"SAX {i}" for i in range(len(rows[0]))]]
    if planes:
        rows.append([np.asarray(p.image) for p in planes])
        titles.append([p.name for p in planes])
    for name, vol in (("recon", volume), ("seeds", seeds)):
        if vol is not None:
            rows.append(list(orthogonal_views(np.asarray(vol))))
            titles.append([f"{name} axial", f"{name} coronal", f"{name} sagittal"])
    return save_grid(path, rows, titles=titles, value_range=(0.0, 1.0), scale=3)

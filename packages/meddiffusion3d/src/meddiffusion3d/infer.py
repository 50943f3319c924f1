"""File-level inference: volume files → latent files (``encode``) → volumes (``decode``).

A latent file (``<name>.latent.pt``, ``torch.load(weights_only=True)``) holds the **normalised**
un-quantised patch latents (the diffusion stage's input, spec §1.4) with everything needed to go back:
the codebook min/max, the input affine and shape, patch size and downsampling factor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medsynth_core import checkpoint as C
from medsynth_core import io as mio
from medsynth_core.checkpoint import atomic_torch_save
from medsynth_core.cli import UserError
from medsynth_core.viz import save_grid, save_volume_views

from .autoencoder import PatchVolumeAE
from .config import Config, DataConfig, build_autoencoder, build_biflownet
from .data import list_volumes, load_volume
from .encode import LatentNorm, decode_latent, patch_encode

log = logging.getLogger("meddiffusion3d")
LATENT_FORMAT = "meddiffusion3d-latent"
AE_KIND = "meddiffusion3d-ae"  # checkpoint kinds of the two training stages
BIFLOWNET_KIND = "meddiffusion3d-biflownet"


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu"):
    """(ae, cfg, ckpt) from a medsynth AE checkpoint (training or ``convert-official``), eval mode."""
    from medsynth_core.config import config_from_dict

    ckpt = C.load_checkpoint(path, kind=AE_KIND, map_location=device)
    cfg = config_from_dict(Config, ckpt.get("config") or {}, source=f"{path} [config]")
    ae = build_autoencoder(cfg.ae)
    stage = int((ckpt.get("extra") or {}).get("stage", 1))
    C.load_module_state(ae, ckpt["models"]["ae"], source=f"{path} [ae]")
    ae.set_stage(stage)
    return ae.to(device).eval(), cfg, ckpt


def load_biflownet(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True):
    """(model, cfg, ckpt) from a ``train`` or ``convert-official`` BiFlowNet checkpoint, eval mode."""
    from medsynth_core.config import config_from_dict

    ckpt = C.load_checkpoint(path, kind=BIFLOWNET_KIND, map_location=device)
    cfg = config_from_dict(Config, ckpt.get("config") or {}, source=f"{path} [config]")
    model = build_biflownet(cfg.biflownet)
    ema = (ckpt.get("emas") or {}).get("ema")
    state = ema["module"] if use_ema and ema else ckpt["models"]["model"]
    C.load_module_state(model, state, source=f"{path} [{'ema' if use_ema and ema else 'model'}]")
    return model.to(device).eval(), cfg, ckpt


def from_model_range(y: np.ndarray, cfg: DataConfig) -> np.ndarray:
    if cfg.intensity == "unit":
        return (y + 1.0) / 2.0
    if cfg.intensity == "ct":
        lo, hi = cfg.ct_window
        return (y + 1.0) / 2.0 * (hi - lo) + lo
    return y


def pad_to_multiple(v: np.ndarray, patch: int, value: float = -1.0) -> np.ndarray:
    tgt = [-(-s // patch) * patch for s in v.shape]
    return np.pad(v, [(0, t - s) for s, t in zip(v.shape, tgt)], constant_values=value)


def _inputs(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.dcm")):
        return list_volumes(p)
    if not p.exists():
        raise mio.MedicalIOError(f"{p}: input not found")
    return [p]


def _stem(p: Path) -> str:
    return p.name.split(".")[0]


@torch.no_grad()
def encode_files(
    ae: PatchVolumeAE,
    cfg: Config,
    inputs: str | Path,
    out: str | Path,
    pad: bool = False,
    chunk: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    out = Path(out)
    norm = LatentNorm.from_codebook(ae)
    p = cfg.data.patch
    written = []
    for f in _inputs(inputs):
        vol, img = load_volume(f, cfg.data)
        mio.warn_if_constant(vol, str(f), "its latent carries no information about the image")
        shape = vol.shape
        if any(s % p for s in shape):
            if not pad:
                raise UserError(
                    f"{f}: shape {shape} is not a multiple of the patch size {p}; pass --pad to pad "
                    f"with background (-1) or crop/resample the volume"
                )
            vol = pad_to_multiple(vol, p)
        out.mkdir(parents=True, exist_ok=True)  # only once an input has been read (issue 18)
        x = torch.from_numpy(vol)[None, None].to(device)
        z = patch_encode(ae, x, p, quantize=False, chunk=chunk or cfg.infer.chunk)
        zn = norm.norm(z)[0].cpu()
        rng = LatentNorm.range_report(zn)
        if rng["frac_outside"] > 0:
            log.info(
                "%s: %.2f%% of normalised latents lie outside [-1, 1] (min %.3f, max %.3f)",
                f.name,
                100 * rng["frac_outside"],
                rng["min"],
                rng["max"],
            )
        dst = out / f"{_stem(f)}.latent.pt"
        atomic_torch_save(
            {
                "format": LATENT_FORMAT,
                "latent": zn,
                "norm": [norm.lo, norm.hi],
                "normalized": True,
                "affine": torch.from_numpy(img.affine),
                "shape": list(shape),
                "patch": p,
                "downsample": ae.downsample,
                "source": str(f),
                "range": rng,
            },
            dst,
        )
        save_grid(
            out / f"{_stem(f)}.latent.png",
            [zn[c, zn.shape[1] // 2] for c in range(zn.shape[0])],
            titles=[f"latent ch {c}" for c in range(zn.shape[0])],
            scale=4,
        )
        written.append(dst)
    return written


def read_latent(path: str | Path) -> dict:
    path = Path(path)
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path}: not a readable latent file ({exc})") from exc
    if not isinstance(d, dict) or d.get("format") != LATENT_FORMAT:
        raise UserError(f"{path}: not a meddiffusion3d latent file (write one with `meddiffusion3d encode`)")
    return d


@torch.no_grad()
def decode_files(
    ae: PatchVolumeAE,
    cfg: Config,
    inputs: str | Path,
    out: str | Path,
    tile: int | None = None,
    overlap: float | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(inputs)
    files = sorted(src.glob("*.latent.pt")) if src.is_dir() else [src]
    if not files:
        raise UserError(f"{src}: no *.latent.pt files")
    written = []
    for f in files:
        d = read_latent(f)
        if d["downsample"] != ae.downsample or d["latent"].shape[0] != ae.embedding_dim:
            raise UserError(
                f"{f}: latent of a {d['downsample']}× / {d['latent'].shape[0]}-channel model does not "
                f"fit this {ae.downsample}× / {ae.embedding_dim}-channel autoencoder"
            )
        z = LatentNorm(*d["norm"]).denorm(d["latent"])[None].to(device)
        y = decode_latent(
            ae,
            z,
            quantize=True,
            tile=cfg.infer.decode_tile if tile is None else tile,
            overlap=cfg.infer.decode_overlap if overlap is None else overlap,
        )
        s = d["shape"]
        vol = y[0, 0, : s[0], : s[1], : s[2]].clamp(-1, 1).cpu().numpy()
        img = mio.MedicalImage.from_dhw(
            from_model_range(vol, cfg.data).astype(np.float32), d["affine"].numpy()
        )
        name = f.name.removesuffix(".latent.pt")
        written.append(mio.write_image(img, out / f"{name}.nii.gz"))
        save_volume_views(out / f"{name}.png", [vol], titles=[name], value_range=(-1.0, 1.0))
    return written

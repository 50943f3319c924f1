"""Class/resolution-conditioned generation (spec §2–§3): sample latents with the EMA BiFlowNet, undo the
latent normalisation of spec §1.4 and decode them with the part-1 decoder, one sample at a time (tiled when
``infer.decode_tile`` > 0); NIfTI with the requested spacing and PNG orthogonal views."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medsynth_core import io as mio
from medsynth_core.cli import UserError
from medsynth_core.viz import save_volume_views

from .biflownet import BiFlowNet, resolution_code
from .config import Config, build_diffusion
from .diffusion import GaussianDiffusion, randn
from .encode import LatentNorm, decode_latent
from .infer import from_model_range, load_autoencoder, load_biflownet


def latent_shape_for(shape: Sequence[int], ae_downsample: int, model: BiFlowNet) -> tuple[int, int, int]:
    """Latent grid of an image shape (D, H, W); raises a UserError naming the valid multiples."""
    shape = tuple(int(s) for s in shape)
    mult = [ae_downsample * m for m in model.shape_multiple]
    if len(shape) != 3 or any(s <= 0 or s % m for s, m in zip(shape, mult, strict=True)):
        raise UserError(
            f"--shape {shape}: every dim must be a positive multiple of {mult} (AE downsampling {ae_downsample} × "
            f"BiFlowNet latent multiple {model.shape_multiple}), e.g. {tuple(-(-s // m) * m for s, m in zip(shape, mult))}"
        )
    return tuple(s // ae_downsample for s in shape)  # type: ignore[return-value]


class Generator:
    """EMA BiFlowNet + diffusion + frozen autoencoder + latent normalisation, ready to sample."""

    def __init__(self, checkpoint: str | Path, autoencoder: str | Path | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        self.model, self.cfg, ck = load_biflownet(checkpoint, self.device, use_ema=True)
        extra = ck.get("extra") or {}
        ae_path = autoencoder or extra.get("autoencoder") or self.cfg.train.autoencoder
        if not ae_path:
            raise UserError(
                f"{checkpoint}: no autoencoder recorded; pass --ae-checkpoint (the AE that wrote the latents)"
            )
        self.ae, self.ae_cfg, _ = load_autoencoder(ae_path, self.device)
        if self.ae.embedding_dim != self.cfg.biflownet.channels:
            raise UserError(
                f"{ae_path}: {self.ae.embedding_dim}-channel autoencoder does not fit the "
                f"{self.cfg.biflownet.channels}-channel BiFlowNet of {checkpoint}"
            )
        self.norm = (
            LatentNorm(*extra["latent_norm"]) if "latent_norm" in extra else LatentNorm.from_codebook(self.ae)
        )
        self.diff: GaussianDiffusion = build_diffusion(self.cfg).to(self.device)

    @torch.no_grad()
    def sample_latents(
        self,
        cls: int,
        latent_shape: Sequence[int],
        n: int = 1,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        denoise_fn=None,
        hint: torch.Tensor | None = None,
        show_progress: bool = True,
    ) -> torch.Tensor:
        d = self.cfg.diffusion
        g = torch.Generator(device=self.device).manual_seed(int(seed))
        z = randn((n, self.cfg.biflownet.channels, *latent_shape), g, device=self.device)
        y = torch.full((n,), int(cls), dtype=torch.long, device=self.device)
        res = resolution_code(latent_shape, n, device=self.device)
        return self.diff.sample(
            denoise_fn or self.model,
            z,
            sampler or d.sampler,
            steps=steps or d.sample_steps,
            eta=d.eta,
            y=y,
            res=res,
            hint=hint,
            guidance_scale=d.guidance_scale,
            generator=g,
            show_progress=show_progress,
        )

    @torch.no_grad()
    def decode(self, zn: torch.Tensor) -> torch.Tensor:
        """Normalised latents (n, C, d, h, w) → volumes (n, 1, D, H, W) in [-1, 1], decoded one at a time."""
        inf = self.ae_cfg.infer
        out = [
            decode_latent(
                self.ae,
                self.norm.denorm(zn[i : i + 1]),
                quantize=True,
                tile=inf.decode_tile,
                overlap=inf.decode_overlap,
            ).clamp(-1, 1)
            for i in range(zn.shape[0])
        ]
        return torch.cat(out)

    def generate(self, cls: int, shape: Sequence[int], n: int = 1, seed: int = 0, **kw) -> torch.Tensor:
        lat = latent_shape_for(shape, self.ae.downsample, self.model)
        return self.decode(self.sample_latents(cls, lat, n, seed, **kw))


def spacing_affine(spacing: Sequence[float]) -> np.ndarray:
    sx, sy, sz = (float(s) for s in spacing)
    return np.diag([sx, sy, sz, 1.0])


def write_volumes(
    vols: torch.Tensor,
    out: str | Path,
    prefix: str,
    spacing: Sequence[float],
    cfg: Config,
    affine: np.ndarray | None = None,
) -> list[Path]:
    """(n, 1, D, H, W) in [-1, 1] → ``prefix_i.nii.gz`` (data intensity units) + orthogonal-view PNGs; the NIfTI
    geometry is ``affine`` when given (restore keeps the input's), else a diagonal one with ``spacing``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(vols.shape[0]):
        v = vols[i, 0].float().cpu().numpy()
        img = mio.MedicalImage.from_dhw(
            from_model_range(v, cfg.data).astype(np.float32),
            spacing_affine(spacing) if affine is None else affine,
        )
        written.append(mio.write_image(img, out / f"{prefix}_{i:03d}.nii.gz"))
        save_volume_views(
            out / f"{prefix}_{i:03d}.png", [v], titles=[f"{prefix}_{i:03d}"], value_range=(-1.0, 1.0)
        )
    return written

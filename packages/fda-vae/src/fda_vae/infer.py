"""Inference: load a trained generator and translate 2D slices or whole 3D NIfTI volumes slice by slice."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medsynth_core.checkpoint import load_checkpoint, load_module_state
from medsynth_core.cli import UserError
from medsynth_core.config import config_from_dict
from medsynth_core.io import MedicalImage, MedicalIOError, read_image, warn_if_constant, write_image

from .config import KIND, Config
from .data import resize_and_normalize
from .model import FDAVAE, build_generator, check_phase


def load_generator(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[FDAVAE, Config]:
    """Generator and config from a medsynth checkpoint (training or ``convert-official``)."""
    ckpt = load_checkpoint(path, kind=KIND)
    if "generator" not in (ckpt.get("models") or {}):
        raise UserError(
            f"{path}: holds no generator (models: {sorted(ckpt.get('models') or {})}); "
            "pass a generator checkpoint"
        )
    cfg = config_from_dict(Config, ckpt.get("config") or {}, source=f"{path} [config]")
    model = build_generator(cfg.model)
    load_module_state(model, ckpt["models"]["generator"], source=str(path))
    return model.to(device).eval(), cfg


@torch.no_grad()
def translate_slices(
    model: FDAVAE,
    slices: np.ndarray,
    src: str,
    image_size: int,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    source: str = "input",
) -> np.ndarray:
    """(N, H, W) slices of phase ``src`` → (N, H, W) synthesized other phase in [−1, 1], resized back to H×W.

    Each slice gets the training preprocessing (zoom to image_size, min-max to [−1, 1]).
    """
    check_phase(src)
    n, h, w = slices.shape
    gen = torch.Generator(device=device).manual_seed(seed) if sample else None
    out = np.empty((n, h, w), np.float32)
    for i in range(0, n, batch_size):
        x = np.stack(
            [
                resize_and_normalize(s, image_size, f"{source} slice {i + j}")
                for j, s in enumerate(slices[i : i + batch_size])
            ]
        )
        y = model.translate(torch.from_numpy(x).to(device), src, sample=sample, generator=gen)
        y = y[:, 0].float().cpu().numpy()
        for j, sl in enumerate(y):
            if (h, w) != sl.shape:
                sl = ndimage.zoom(sl, (h / sl.shape[0], w / sl.shape[1]), order=1)[:h, :w]
            out[i + j] = sl
    return out


def synthesize_file(
    model: FDAVAE,
    cfg: Config,
    src_path: str | os.PathLike,
    dst_path: str | os.PathLike,
    src: str = "a",
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    output_range: str = "model",
    preview: bool = True,
) -> dict[str, Any]:
    """Translate one 2D slice or 3D volume (axial slices = last array axis) and write it with the input's
    geometry (same shape and affine). ``output_range``: ``model`` ([−1,1]) or ``unit`` ([0,1])."""
    try:
        img = read_image(src_path, expect_ndim=(2, 3))
    except MedicalIOError as exc:
        raise UserError(str(exc)) from exc
    dhw = img.to_dhw()  # (k, j, i) or (j, i)
    stack = dhw[None] if dhw.ndim == 2 else dhw
    warn_if_constant(dhw, str(src_path), "every slice is min-max normalised to zeros")
    out = translate_slices(
        model, stack, src, cfg.data.image_size, sample, seed, batch_size, device, str(src_path)
    )
    if output_range == "unit":
        out = (out + 1.0) / 2.0
    elif output_range != "model":
        raise UserError(f"output range must be 'model' or 'unit', got {output_range!r}")
    result = MedicalImage.from_dhw(out[0] if dhw.ndim == 2 else out, img.affine, img.ndim_spatial)
    write_image(result, dst_path)
    info = {"input": str(src_path), "output": str(dst_path), "shape": list(img.spatial_shape), "src": src}
    if preview:
        from medsynth_core.viz import save_grid

        k = stack.shape[0] // 2
        png = Path(str(dst_path).removesuffix(".gz").removesuffix(".nii") + ".png")
        save_grid(png, [stack[k], out[k]], titles=["input", "synthesized"])
        info["preview"] = str(png)
    return info

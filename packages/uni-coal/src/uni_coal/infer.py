"""Inference: any source -> target modality at any slice thickness, on arrays or NIfTI (spec §1 cmsreval)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core import checkpoint as C
from medsynth_core.cli import UserError
from medsynth_core.config import ConfigError, config_from_dict

from .config import Config
from .data import crop_or_pad, gather_stack, output_plan, read_lps_array, rescale_uint8, to_unit
from .model import UniCOALGenerator

KIND = "uni-coal"


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[UniCOALGenerator, Config]:
    """G_ema and the config saved in a checkpoint (ours, or converted with ``convert-official``)."""
    ckpt = C.load_checkpoint(path, kind=KIND)
    try:
        cfg = config_from_dict(Config, ckpt.get("config") or {}, source=f"{path} [config]")
    except ConfigError as exc:
        raise UserError(str(exc)) from exc
    g = UniCOALGenerator(cfg.generator)
    C.load_module_state(g, ckpt["models"]["G_ema"], source=str(path))
    return g.to(device).eval(), cfg


def _pad_back(x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`crop_or_pad` on the last two axes (crop what was padded, pad with -1 what was cut)."""
    for ax, n in zip((-2, -1), shape[-2:]):
        size = x.shape[ax]
        if n < size:
            start = (size - n) // 2
            x = np.take(x, range(start, start + n), axis=ax)
        elif n > size:
            before = (n - size) // 2
            pad = [(0, 0)] * x.ndim
            pad[ax] = (before, n - size - before)
            x = np.pad(x, pad, constant_values=-1.0)
    return x


@torch.no_grad()
def synthesize_volume(
    g: UniCOALGenerator,
    cfg: Config,
    source: np.ndarray,
    target: str,
    thickness: float = 1,
    out_step: float = 1,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """``source``: uint8 ``(n, H, W)`` volume whose slices are ``thickness`` output-grid units apart.
    Returns the prediction in [-1, 1]-space, ``(n_out, H, W)`` with slices ``out_step`` apart."""
    mods = list(cfg.data.modalities)
    if target not in mods:
        raise UserError(f"target modality '{target}' unknown; the model knows {mods}")
    if source.ndim != 3:
        raise UserError(f"source volume must be 3D (slices, H, W), got shape {source.shape}")
    r = cfg.generator.img_resolution
    gen = torch.Generator().manual_seed(seed)
    plan = output_plan(source.shape[0], float(thickness), float(out_step))
    c = torch.zeros(len(mods))
    c[mods.index(target)] = 1.0
    preds = []
    for start in range(0, len(plan), batch_size):
        chunk = plan[start : start + batch_size]
        a = np.stack(
            [to_unit(crop_or_pad(gather_stack(source, [k - 1, k, k + 1, k + 2]), r)) for k, _ in chunk]
        )
        a = torch.from_numpy(a).to(device)
        n = a.shape[0]
        delta = torch.tensor([[d] for _, d in chunk], dtype=torch.float32, device=device)
        z = torch.randn([n, cfg.generator.z_dim], generator=gen).to(device)
        out = g(z, c.expand(n, -1).to(device), delta, a)
        preds.append(out[:, 0].cpu().numpy())
    return _pad_back(np.concatenate(preds, 0), source.shape)


def synthesize_nifti(
    checkpoint: str | Path,
    input_path: str | Path,
    output_path: str | Path,
    target: str,
    thickness: float = 1,
    out_step: float = 1,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "cpu",
    preview: bool = True,
) -> dict[str, Any]:
    """NIfTI in (LPS-reoriented, slice axis = array axis 0) -> NIfTI out with the target slice spacing."""
    import SimpleITK as sitk

    g, cfg = load_generator(checkpoint, device)
    arr, img = read_lps_array(input_path)
    try:
        src = arr if arr.dtype == np.uint8 else rescale_uint8(arr)
    except ValueError as exc:
        raise UserError(f"{input_path}: {exc}") from exc
    pred = synthesize_volume(g, cfg, src, target, thickness, out_step, seed, batch_size, device)
    out = np.clip((pred + 1.0) * 127.5, 0, 255).astype(np.float32)
    oimg = sitk.GetImageFromArray(out)
    sp = list(img.GetSpacing())
    sp[2] = sp[2] * out_step / thickness  # array axis 0 = image axis 2; first slice aligned
    oimg.SetSpacing(sp)
    oimg.SetOrigin(img.GetOrigin())
    oimg.SetDirection(img.GetDirection())
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(oimg, str(output_path))
    if preview:
        from medsynth_core.viz import save_grid

        mid = out.shape[0] // 2
        src_mid = min(int(mid * out_step / thickness), src.shape[0] - 1)
        save_grid(
            output_path.with_suffix("").with_suffix(".png"),
            [src[src_mid], out[mid]],
            titles=["source", f"synth {target}"],
            value_range=(0, 255),
        )
    return {"output": str(output_path), "shape": list(out.shape), "spacing": sp}

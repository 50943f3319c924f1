"""``drdm convert-official``: an official RecResACNet ``.pth`` (a plain state_dict, often saved on cuda:0)
-> a medsynth checkpoint with the official key set, plus the mapping of official configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medsynth_core import checkpoint as C
from medsynth_core.cli import UserError
from medsynth_core.config import config_to_dict

from .config import DRDMConfig, build_network, load

PREFIXES = ("module.", "network.", "model.")


def read_official_state(src: str | Path) -> dict[str, torch.Tensor]:
    """Load with ``map_location='cpu'`` (Q10) and strip DataParallel / wrapper prefixes."""
    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src}: official checkpoint not found")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{src}: cannot be read as a torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and obj.get("format") == C.FORMAT:
        raise UserError(f"{src}: already a medsynth checkpoint; no conversion needed")
    for key in ("state_dict", "model", "network"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{src}: not a state_dict of tensors")
    out = {}
    for k, v in obj.items():
        for p in PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
        out[k] = v.float() if v.is_floating_point() else v
    return out


def config_for_state(state: dict[str, torch.Tensor], config: str | Path | None = None) -> DRDMConfig:
    """Our config from an official/our YAML, else inferred from the tensors (ndims, T, input channels)."""
    if config is not None:
        cfg = load(config)
    else:
        cfg = DRDMConfig()
    if "conv_out.weight" not in state or "time_embed.weight" not in state:
        raise UserError("this state_dict is not a RecResACNet (no conv_out.weight / time_embed.weight)")
    nd = state["conv_out.weight"].ndim - 2
    steps, emb = state["time_embed.weight"].shape
    chn = state["b1.0.conv0.weight"].shape[1] if "b1.0.conv0.weight" in state else 1
    if config is not None and (cfg.model.ndims != nd or cfg.diffusion.timesteps != steps):
        raise UserError(
            f"config {config} (ndims={cfg.model.ndims}, timesteps={cfg.diffusion.timesteps}) does not "
            f"match the checkpoint (ndims={nd}, timesteps={steps})"
        )
    cfg.model.ndims, cfg.model.time_emb_dim, cfg.model.num_input_chn = nd, int(emb), int(chn)
    cfg.diffusion.timesteps = int(steps)
    if config is None and nd == 3:  # LCT defaults (spec section 8)
        cfg.diffusion.img_size, cfg.diffusion.padding_mode, cfg.diffusion.resample_mode = (
            128,
            "border",
            "bilinear",
        )
        cfg.augment.start_noise_step, cfg.augment.noise_step = 64, 1
    return cfg


def convert_official(src: str | Path, dst: str | Path, config: str | Path | None = None) -> dict[str, Any]:
    state = read_official_state(src)
    cfg = config_for_state(state, config)
    net = build_network(cfg)
    own = net.state_dict()
    unmapped = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state)
    shapes = sorted(k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    if missing or shapes:
        raise UserError(
            f"{src}: cannot convert: missing keys {missing[:10]}, shape mismatches {shapes[:10]}, "
            f"unmapped keys {unmapped[:10]}"
        )
    net.load_state_dict({k: state[k] for k in own}, strict=True)
    ckpt = C.build_checkpoint(
        kind="drdm",
        step=0,
        models={"network": net},
        config=config_to_dict(cfg),
        include_rng=False,
        extra={"converted_from": str(src)},
    )
    C.atomic_torch_save(ckpt, dst)
    return {
        "src": str(src),
        "dst": str(dst),
        "tensors": len(own),
        "unmapped": unmapped,
        "ndims": cfg.model.ndims,
    }

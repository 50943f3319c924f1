"""Official DiffAE / cine-SR checkpoints and constructor arguments → this package (contract: convert-official).

Official keys (``BeatGANsAutoencModel``): ``encoder.*`` → ``encoder.*``; ``time_embed.time_embed.{0,2}`` →
``unet.time_embed.{0,2}``; everything else → ``unet.*``. Lightning checkpoints hold ``model.`` (raw) and
``ema_model.`` (EMA) prefixes; inference uses the EMA weights (spec §1.2).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medsynth_core.cli import UserError

from .model import DiffAE, ModelConfig

# official BeatGANsAutoencConfig fields that must keep the DiffAE defaults we implement
_FIXED = {
    "dims": 2,
    "num_classes": None,
    "resnet_two_cond": True,
    "resblock_updown": True,
    "use_new_attention_order": False,
    "enc_pool": "adaptivenonzero",
    "conv_resample": True,
    "resnet_use_zero_module": True,
    "latent_net_conf": None,
}


def config_from_official(constructor: Mapping[str, Any]) -> ModelConfig:
    """Map official ``BeatGANsAutoencConfig(**constructor)`` arguments to :class:`ModelConfig`."""
    c = dict(constructor)
    for k, v in _FIXED.items():
        if k in c and c[k] is not None and v is not None and c[k] != v:
            raise UserError(f"official constructor: {k}={c[k]!r} is not supported (only {v!r})")
        if k in ("num_classes", "latent_net_conf") and c.get(k) is not None:
            raise UserError(f"official constructor: {k}={c[k]!r} is not supported (only None)")
    if c.get("time_embed_channels") not in (None, c.get("embed_channels")):
        raise UserError("official constructor: time_embed_channels must be None or equal embed_channels")
    if c.get("input_channel_mult") not in (None, c.get("channel_mult")):
        raise UserError("official constructor: input_channel_mult must be None or equal channel_mult")
    z = c.get("resnet_cond_channels") or c.get("embed_channels", 512)
    if c.get("enc_out_channels", z) != z:
        raise UserError(
            f"official constructor: enc_out_channels={c['enc_out_channels']} must equal the ResBlock "
            f"condition width {z} (z_sem enters the ResBlocks unchanged)"
        )
    enc_attn = c.get("enc_attn_resolutions")
    return ModelConfig(
        image_size=int(c.get("image_size", 64)),
        in_channels=int(c.get("in_channels", 3)),
        out_channels=int(c.get("out_channels") or c.get("in_channels", 3)),
        base_channels=int(c.get("model_channels", 64)),
        channel_mult=tuple(int(m) for m in c.get("channel_mult", (1, 2, 4, 8))),
        num_res_blocks=int(c.get("num_res_blocks", 2)),
        num_input_res_blocks=c.get("num_input_res_blocks"),
        attention_resolutions=tuple(int(r) for r in c.get("attention_resolutions", (16,))),
        embed_channels=int(c.get("embed_channels", 512)),
        z_channels=int(z),
        enc_channel_mult=tuple(int(m) for m in (c.get("enc_channel_mult") or c.get("channel_mult"))),
        enc_num_res_blocks=int(c.get("enc_num_res_block", 2)),
        enc_attention_resolutions=tuple(int(r) for r in enc_attn) if enc_attn else None,
        num_heads=int(c.get("num_heads", 1)),
        num_head_channels=int(c.get("num_head_channels", -1)),
        dropout=float(c.get("dropout", 0.1)),
        norm_groups=32,
    )


def map_key(key: str) -> str:
    if key.startswith("encoder."):
        return key
    if key.startswith("time_embed.time_embed."):
        return "unet.time_embed." + key[len("time_embed.time_embed.") :]
    return "unet." + key


def convert_state_dict(
    official: Mapping[str, torch.Tensor], model: DiffAE | None = None, prefix: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official state dict (optionally Lightning-prefixed) → ours. Returns ``(state, unmapped_keys)``.

    ``prefix``: ``"ema_model."`` (default when present), ``"model."`` or ``""``.
    """
    keys = list(official)
    if prefix is None:
        prefix = (
            "ema_model."
            if any(k.startswith("ema_model.") for k in keys)
            else ("model." if any(k.startswith("model.") for k in keys) else "")
        )
    own = model.state_dict() if model is not None else None
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for k, v in official.items():
        if prefix and not k.startswith(prefix):
            if not (k.startswith("model.") or k.startswith("ema_model.")):
                unmapped.append(k)
            continue
        new = map_key(k[len(prefix) :])
        if own is not None and (new not in own or tuple(own[new].shape) != tuple(v.shape)):
            unmapped.append(k)
            continue
        out[new] = v
    return out, unmapped


def load_official(path: str | Path, trust_pickle: bool = False) -> dict[str, Any]:
    """Read an official checkpoint with ``weights_only=True`` (``medsynth_core.checkpoint.load_official_file``);
    a Lightning file whose ``hyper_parameters`` hold pickled objects (the official ``TrainConfig``) is refused
    in one line unless ``trust_pickle`` (full pickle can run code: only for files you trust)."""
    from medsynth_core.checkpoint import CheckpointError, load_official_file

    try:
        return load_official_file(path, trust_pickle=trust_pickle)
    except CheckpointError as exc:
        raise UserError(str(exc)) from exc


def convert_official(
    src: str | Path,
    dst: str | Path,
    constructor: Mapping[str, Any] | None = None,
    prefix: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Convert an official Lightning ``.ckpt`` (or a plain state dict) into a medsynth checkpoint.
    ``trust_pickle``: load a file holding pickled objects beyond tensors (see :func:`load_official`)."""
    from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint
    from medsynth_core.config import config_to_dict

    from .config import Config

    obj = load_official(src, trust_pickle)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, Mapping) or not sd:
        raise UserError(f"{src}: no state_dict found")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if constructor is None:
        hp = obj.get("hyper_parameters", {}) if isinstance(obj, dict) else {}
        conf = hp.get("conf") if isinstance(hp, Mapping) else None
        constructor = getattr(conf, "__dict__", None) if conf is not None else None
        if constructor is None:
            raise UserError(
                f"{src}: holds no model configuration; pass --config with the matching model settings"
            )
    mcfg = constructor if isinstance(constructor, ModelConfig) else config_from_official(constructor)
    model = DiffAE(mcfg)
    state, unmapped = convert_state_dict(sd, model, prefix)
    missing = [k for k in model.state_dict() if k not in state]
    if missing:
        raise UserError(f"{src}: {len(missing)} model keys missing after conversion, e.g. {missing[:5]}")
    model.load_state_dict(state)
    models, emas = {"model": model}, None
    if (
        prefix is None
        and any(k.startswith("model.") for k in sd)
        and any(k.startswith("ema_model.") for k in sd)
    ):
        # Lightning checkpoint with both: raw weights → "model", EMA weights → the EMA used for inference
        from medsynth_core.training import EMA

        raw = DiffAE(mcfg)
        raw.load_state_dict(convert_state_dict(sd, raw, "model.")[0])
        ema = EMA(raw)
        ema.module.load_state_dict(state)
        models, emas = {"model": raw}, {"ema": ema}
    cfg = Config(model=mcfg)
    ckpt = build_checkpoint(
        kind="mgdcr",
        step=int(obj.get("global_step", 0)) if isinstance(obj, dict) else 0,
        models=models,
        emas=emas,
        config=config_to_dict(cfg),
        extra={"converted_from": str(src), "unmapped": unmapped},
        include_rng=False,
    )
    atomic_torch_save(ckpt, dst)
    return {"dst": str(dst), "unmapped": unmapped, "n_keys": len(state)}

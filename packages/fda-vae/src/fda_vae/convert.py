"""Official FDA-VAE checkpoints (``generator_*.pth``, ``discriminator_*.pth``) → this package.

Key map (spec §2): official ``decoder``/``post_quant_conv`` (``ct``, phase_2) → ``decoder_b``/
``post_quant_conv_b``; ``decoder_2``/``post_quant_conv_2`` (``mr``, phase_1) → ``decoder_a``/
``post_quant_conv_a``; attention ``X.to_q|to_k|to_v`` → ``X.attn.to_q|...``; ``X.proj_attn.*`` is
dropped (never applied, spec §6.1); up-sampler ``X.conv.conv.*`` → ConvTranspose ``X.*``.
DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are stripped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import DiscriminatorConfig, ModelConfig

_RENAME = {
    "decoder_2.": "decoder_a.",
    "decoder.": "decoder_b.",
    "post_quant_conv_2.": "post_quant_conv_a.",
    "post_quant_conv.": "post_quant_conv_b.",
}


def model_config_from_official(constructor: Mapping[str, Any]) -> ModelConfig:
    """Official ``AutoencoderKL(...)`` keyword arguments → :class:`ModelConfig`."""
    c = dict(constructor)
    nrb = c.get("num_res_blocks", 2)
    if isinstance(nrb, list | tuple):
        if len(set(nrb)) != 1:
            raise ValueError(f"num_res_blocks={nrb}: only one value for every level is supported")
        nrb = nrb[0]
    channels = list(c.get("num_channels", c.get("channels", [64, 128, 256])))
    att = [bool(a) for a in c.get("attention_levels", [False] * len(channels))]
    return ModelConfig(
        spatial_dims=int(c.get("spatial_dims", 2)),
        in_channels=int(c.get("in_channels", 1)),
        out_channels=int(c.get("out_channels", 1)),
        channels=[int(x) for x in channels],
        num_res_blocks=int(nrb),
        latent_channels=int(c.get("latent_channels", 16)),
        norm_num_groups=int(c.get("norm_num_groups", 32)),
        norm_eps=float(c.get("norm_eps", 1e-6)),
        attention_levels=att if any(att) else [],
        with_encoder_nonlocal_attn=bool(c.get("with_encoder_nonlocal_attn", True)),
        with_decoder_nonlocal_attn=bool(c.get("with_decoder_nonlocal_attn", True)),
        # flash attention (xformers) is replaced by SDPA; same maths (spec §6.2)
        use_flash_attention=True,
    )


def disc_config_from_official(constructor: Mapping[str, Any]) -> DiscriminatorConfig:
    """Official ``PatchDiscriminator(...)`` keyword arguments (monai-generative names) → config."""
    c = dict(constructor)
    return DiscriminatorConfig(
        num_layers_d=int(c.get("num_layers_d", 3)),
        channels=int(c.get("num_channels", c.get("channels", 32))),
        norm=str(c.get("norm", "INSTANCE")),
    )


def _strip(key: str) -> str:
    for p in ("module.", "_orig_mod."):
        while key.startswith(p):
            key = key[len(p) :]
    return key


def map_generator_keys(keys, attention: list[str], upsamplers: list[str]) -> tuple[dict[str, str], list[str]]:
    """Official key → our key for every mappable key; the second list holds dropped/unmapped keys."""
    mapping, dropped = {}, []
    for key in keys:
        new = _strip(key)
        for old, rep in _RENAME.items():
            if new.startswith(old):
                new = rep + new[len(old) :]
                break
        target = None
        for prefix in attention:
            if new.startswith(prefix + "."):
                rest = new[len(prefix) + 1 :]
                if rest.startswith("proj_attn."):
                    target = ""
                elif rest.split(".")[0] in ("to_q", "to_k", "to_v"):
                    target = f"{prefix}.attn.{rest}"
                else:
                    target = new
                break
        if target is None:
            for prefix in upsamplers:
                if new.startswith(prefix + ".conv.conv."):
                    target = prefix + "." + new[len(prefix) + len(".conv.conv.") :]
                    break
        if target is None:
            target = new
        if target:
            mapping[key] = target
        else:
            dropped.append(key)
    return mapping, dropped


def convert_generator_state(
    state: Mapping[str, torch.Tensor], model
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official generator state dict → ours. Returns (state, dropped keys). Raises on unmapped keys."""
    mapping, dropped = map_generator_keys(list(state), model.attention_prefixes(), model.upsampler_prefixes())
    own = model.state_dict()
    out = {mapping[k]: v for k, v in state.items() if k in mapping}
    unknown = sorted(k for k, v in mapping.items() if v not in own)
    missing = sorted(set(own) - set(out))
    bad = [
        f"{k}: {tuple(out[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in out and tuple(out[k].shape) != tuple(own[k].shape)
    ]
    if unknown or missing or bad:
        raise ValueError(
            "official generator does not fit this config: "
            f"unmapped keys {unknown[:8]}, missing keys {missing[:8]}, shape mismatches {bad[:8]}"
        )
    return out, dropped


def convert_discriminator_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """monai-generative PatchDiscriminator keys are identical to MONAI core's (prefixes stripped)."""
    return {_strip(k): v for k, v in state.items()}


def _load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from medsynth_core.cli import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: official checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{path}: cannot be read as a torch state dict ({type(exc).__name__}: {exc})"
        ) from exc
    for key in ("state_dict", "model", "generator"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"{path}: not a state dict of tensors (official generator_*.pth / discriminator_*.pth)"
        )
    return obj


def is_generator_state(state: Mapping[str, Any]) -> bool:
    return any(_strip(k).startswith("quant_conv_mu.") for k in state)


def convert_official(
    src: str | os.PathLike, dst: str | os.PathLike, cfg=None, constructor: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Convert one official file (generator or discriminator) into a medsynth checkpoint at ``dst``.

    The model config comes from ``constructor`` (official keyword arguments), else ``cfg`` (ours),
    else is inferred from the weights (paper defaults for what cannot be inferred).
    """
    from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint
    from medsynth_core.cli import UserError
    from medsynth_core.config import config_to_dict

    from .config import KIND, Config
    from .model import build_discriminator, build_generator

    state = _load(src)
    user_cfg = cfg is not None
    cfg = cfg or Config()
    report: dict[str, Any] = {"source": str(src), "destination": str(dst)}
    if is_generator_state(state):
        if constructor is not None:
            cfg.model = model_config_from_official(constructor)
        elif not user_cfg:
            try:
                cfg.model = infer_model_config(state, cfg.model)
            except (KeyError, IndexError, ValueError) as exc:
                raise UserError(
                    f"{src}: cannot read the generator config off the weights ({exc!r}); "
                    "pass --constructor with the official constructor arguments"
                ) from exc
        model = build_generator(cfg.model)
        try:
            new, dropped = convert_generator_state(state, model)
        except ValueError as exc:
            raise UserError(f"{src}: {exc}") from exc
        model.load_state_dict(new, strict=True)
        models = {"generator": model}
        report.update(network="generator", dropped_keys=dropped, mapped=len(new))
    else:
        if constructor is not None:
            cfg.disc = disc_config_from_official(constructor)
        elif not user_cfg:
            try:
                cfg.disc = infer_disc_config(state, cfg.disc)
            except (KeyError, IndexError, ValueError) as exc:
                raise UserError(
                    f"{src}: not an official generator or discriminator state dict ({exc!r})"
                ) from exc
        disc = build_discriminator(
            num_layers_d=cfg.disc.num_layers_d, channels=cfg.disc.channels, norm=cfg.disc.norm
        )
        new = convert_discriminator_state(state)
        own = disc.state_dict()
        unmapped = sorted(set(new) - set(own))
        missing = sorted(set(own) - set(new))
        if unmapped or missing:
            raise UserError(
                f"{src}: discriminator keys do not fit: unmapped {unmapped[:8]}, missing {missing[:8]}"
            )
        disc.load_state_dict(new, strict=True)
        models = {"disc": disc}
        report.update(network="discriminator", dropped_keys=[], mapped=len(new))
    ckpt = build_checkpoint(
        kind=KIND,
        step=0,
        models=models,
        config=config_to_dict(cfg),
        extra={"converted_from": str(src)},
        include_rng=False,
    )
    atomic_torch_save(ckpt, dst)
    return report


def infer_model_config(state: Mapping[str, torch.Tensor], base: ModelConfig) -> ModelConfig:
    """Read channels / latent size / res-block count off an official generator state dict.

    The GroupNorm group count is not stored in the weights: it becomes the largest power of two <= the
    base config's value that divides every channel count; pass ``--constructor`` to be exact.
    """
    s = {_strip(k): v for k, v in state.items()}
    latent = int(s["quant_conv_mu.conv.weight"].shape[0])
    first = int(s["encoder.blocks.0.conv.weight"].shape[0])
    in_ch = int(s["encoder.blocks.0.conv.weight"].shape[1])
    downs = sorted(
        {
            int(k.split(".")[2])
            for k in s
            if k.startswith("encoder.blocks.")
            and ".conv.conv." in k
            and "conv1" not in k
            and "conv2" not in k
            and "nin_shortcut" not in k
        }
    )
    levels = len(downs) + 1
    nrb = downs[0] - 1 if downs else base.num_res_blocks
    chans = [first]
    for d in downs:
        chans.append(int(s[f"encoder.blocks.{d + 1}.conv1.conv.weight"].shape[0]))
    out_ch = int(s[[k for k in s if k.startswith("decoder.blocks.")][-2]].shape[0])
    gn = base.norm_num_groups
    while any(c % gn for c in chans):
        gn //= 2
    return ModelConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        channels=chans[:levels],
        num_res_blocks=nrb,
        latent_channels=latent,
        norm_num_groups=max(gn, 1),
        norm_eps=base.norm_eps,
    )


def infer_disc_config(state: Mapping[str, torch.Tensor], base: DiscriminatorConfig) -> DiscriminatorConfig:
    s = {_strip(k): v for k, v in state.items()}
    ch = int(s["initial_conv.conv.weight"].shape[0])
    layers = len([k for k in s if k.split(".")[0].isdigit() and k.endswith("conv.weight")])
    return DiscriminatorConfig(num_layers_d=layers, channels=ch, norm=base.norm)

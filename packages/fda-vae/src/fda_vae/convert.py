"""Official FDA-VAE checkpoints (``generator_*.pth``, ``discriminator_*.pth``) → this package.

Key map (spec §2): official ``decoder``/``post_quant_conv`` (``ct``, phase_2) → ``decoder_b``/
``post_quant_conv_b``; ``decoder_2``/``post_quant_conv_2`` (``mr``, phase_1) → ``decoder_a``/
``post_quant_conv_a``; attention ``X.to_q|to_k|to_v`` → ``X.attn.to_q|...``; ``X.proj_attn.*`` is
dropped (never applied, spec §6.1); up-sampler ``X.conv.conv.*`` → ConvTranspose ``X.*``.
DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes are stripped.
"""

from __future__ import annotations

import math
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


def _load_with_meta(
    path: str | os.PathLike,
) -> tuple[dict[str, torch.Tensor], list[tuple[str, Mapping[str, Any]]]]:
    """(state dict, the (path, container) pairs it was found in, outermost first). The official trainer
    saves bare state dicts; wrappers such as ``{"state_dict": ..., "config": ...}`` keep their other
    entries here."""
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
    containers: list[tuple[str, Mapping[str, Any]]] = []
    where = ""
    for _ in range(4):  # descend through wrappers, e.g. {"generator": {"state_dict": ..., ...}}
        key = next(
            (
                k
                for k in ("state_dict", "model", "generator")
                if isinstance(obj, dict) and isinstance(obj.get(k), dict)
            ),
            None,
        )
        if key is None:
            break
        containers.append((where, obj))
        where = f"{where}.{key}" if where else key
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"{path}: not a state dict of tensors (official generator_*.pth / discriminator_*.pth)"
        )
    return obj, containers


def _load(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return _load_with_meta(path)[0]


_META_KEYS = (
    "constructor",
    "config",
    "model_config",
    "hyper_parameters",
    "hparams",
    "args",
    "kwargs",
    "model",
)


def stored_constructor(
    containers: list[tuple[str, Mapping[str, Any]]],
) -> tuple[Mapping[str, Any], str] | None:
    """The nearest mapping holding ``norm_num_groups`` in the non-tensor entries around the state dict
    (e.g. a stored constructor, config or Lightning ``hyper_parameters``), with where it was found."""

    def search(obj: Any, where: str, depth: int) -> tuple[Mapping[str, Any], str] | None:
        if not isinstance(obj, Mapping) or depth > 3:
            return None
        if "norm_num_groups" in obj and not isinstance(obj["norm_num_groups"], torch.Tensor):
            return obj, where
        for k in _META_KEYS:
            if k in obj and isinstance(obj[k], Mapping):
                found = search(obj[k], f"{where}.{k}" if where else k, depth + 1)
                if found is not None:
                    return found
        return None

    for where, container in reversed(containers):  # nearest to the state dict first
        found = search(container, where, 0)
        if found is not None:
            return found
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def is_generator_state(state: Mapping[str, Any]) -> bool:
    return any(_strip(k).startswith("quant_conv_mu.") for k in state)


def convert_official(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    cfg=None,
    constructor: Mapping[str, Any] | None = None,
    norm_num_groups: int | None = None,
) -> dict[str, Any]:
    """Convert one official file (generator or discriminator) into a medsynth checkpoint at ``dst``.

    The generator config comes from ``constructor`` (official keyword arguments; omitted ones take the
    official defaults), else ``cfg`` (ours), else is read off the weights. The weights do not hold the
    GroupNorm group count: it then comes from ``norm_num_groups``, else from a constructor / config stored
    in the file beside the state dict, else from the channels when only one group count divides them
    all (1); otherwise the conversion is refused (never guessed). ``report["norm_num_groups_from"]``
    says which source was used.
    """
    from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint
    from medsynth_core.cli import UserError
    from medsynth_core.config import config_to_dict

    from .config import KIND, Config
    from .model import build_discriminator, build_generator

    state, containers = _load_with_meta(src)
    user_cfg = cfg is not None
    cfg = cfg or Config()
    report: dict[str, Any] = {"source": str(src), "destination": str(dst)}
    if is_generator_state(state):
        stored = stored_constructor(containers)
        full = stored is not None and any(k in stored[0] for k in ("num_channels", "latent_channels"))
        if constructor is not None or full:
            # official keyword arguments: given (--constructor) or stored in the file beside the weights
            given = constructor is not None
            cons = dict(constructor if given else stored[0])
            groups_from = (
                ("--constructor" if given else f"checkpoint [{stored[1] or 'top level'}]")
                if "norm_num_groups" in cons
                else "official default (32; not in --constructor)"
            )
            if norm_num_groups is not None:
                cons["norm_num_groups"], groups_from = int(norm_num_groups), "--norm-num-groups"
            try:
                cfg.model = model_config_from_official(cons)
            except ValueError as exc:
                where = "--constructor" if given else f"{src} [{stored[1] or 'top level'}]"
                raise UserError(f"{where}: {exc}") from exc
        elif user_cfg and norm_num_groups is None:
            groups_from = "--config"
        else:
            try:
                inferred = infer_model_config(state, cfg.model)
            except (KeyError, IndexError, ValueError) as exc:
                raise UserError(
                    f"{src}: cannot read the generator config off the weights ({exc!r}); "
                    "pass --constructor with the official constructor arguments"
                ) from exc
            options = _divisors(math.gcd(*inferred.channels))
            if norm_num_groups is not None:
                groups, groups_from = int(norm_num_groups), "--norm-num-groups"
            elif stored is not None:
                groups = int(stored[0]["norm_num_groups"])
                groups_from = f"checkpoint [{stored[1] or 'top level'}]"
            elif len(options) == 1:
                groups, groups_from = options[0], "channels (1 is the only group count dividing them)"
            else:
                raise UserError(
                    f"{src}: the GroupNorm group count is not stored in this state dict and channels "
                    f"{inferred.channels} allow {options}; pass --norm-num-groups N (the official "
                    "norm_num_groups; the paper uses 32) or --constructor with the official constructor "
                    "arguments (norm_num_groups key)"
                )
            if groups not in options:
                raise UserError(
                    f"{src}: norm_num_groups={groups} ({groups_from}) does not divide the channels "
                    f"{inferred.channels} read off the weights; pass --norm-num-groups with one of {options}"
                )
            if user_cfg:  # our --config, with the group count overridden
                inferred = ModelConfig(**{**vars(cfg.model), "norm_num_groups": groups})
            else:
                inferred = ModelConfig(**{**vars(inferred), "norm_num_groups": groups})
            cfg.model = inferred
        report["norm_num_groups"] = cfg.model.norm_num_groups
        report["norm_num_groups_from"] = groups_from
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


def infer_model_config(
    state: Mapping[str, torch.Tensor], base: ModelConfig, norm_num_groups: int = 1
) -> ModelConfig:
    """Read channels / latent size / res-block count off an official generator state dict.

    The GroupNorm group count is not stored in the weights, so the caller gives it (``norm_num_groups``,
    default 1, which divides any channel count); :func:`convert_official` never guesses it.
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
    return ModelConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        channels=chans[:levels],
        num_res_blocks=nrb,
        latent_channels=latent,
        norm_num_groups=int(norm_num_groups),
        norm_eps=base.norm_eps,
    )


def infer_disc_config(state: Mapping[str, torch.Tensor], base: DiscriminatorConfig) -> DiscriminatorConfig:
    s = {_strip(k): v for k, v in state.items()}
    ch = int(s["initial_conv.conv.weight"].shape[0])
    layers = len([k for k in s if k.split(".")[0].isdigit() and k.endswith("conv.weight")])
    return DiscriminatorConfig(num_layers_d=layers, channels=ch, norm=base.norm)

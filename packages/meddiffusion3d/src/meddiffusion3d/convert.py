"""Official 3D-MedDiffusion PatchVolume checkpoints and configs → this package.

* ``config_from_official(cfg)``: the official ``config/PatchVolume_{4x,8x}[_s2].yaml`` (``model:`` +
  ``dataset:``; an OmegaConf dump or plain dict) → override mapping for :class:`~.config.Config`.
* ``convert_biflownet_checkpoint``: an official BiFlowNet training checkpoint (``model``/``ema``/``args``) →
  a ``train``-style checkpoint (spec §2 key mapping, at the end of this module).
* ``convert_state_dict(sd)``: Lightning ``state_dict`` (or the whole ``.ckpt``) → ``{"ae": …, "disc": …}``.
  Module names are the official ones, so the AE and discriminator keys map one to one; the frozen
  LPIPS copy (``perceptual_loss.*``) is dropped and listed; the codebook gets its ``initialized`` flag
  set (the official flag was never saved, spec §6.1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint
from medsynth_core.cli import UserError
from medsynth_core.config import config_from_dict, config_to_dict, merge_dicts

from .biflownet import _triple
from .config import Config, build_autoencoder, build_discriminator

KIND = "meddiffusion3d-ae"
AE_PREFIXES = ("encoder.", "decoder.", "pre_vq_conv.", "post_vq_conv.", "codebook.")
DISC_PREFIX = "volume_discriminator."
IGNORED_PREFIXES = ("perceptual_loss.",)

# official model keys → ours (ae section unless noted); keys absent here are run settings we ignore
_MODEL_KEYS = {
    "embedding_dim": "embedding_dim",
    "n_codes": "n_codes",
    "n_hiddens": "n_hiddens",
    "disc_channels": "disc_channels",
    "disc_layers": "disc_layers",
    "disc_loss_type": "disc_loss",
    "volume_gan_weight": "gan_w",
    "l1_weight": "l1_w",
    "gan_feat_weight": "fm_w",
    "perceptual_weight": "tp_w",
    "restart_thres": "restart_thres",
    "norm_type": "norm_type",
    "num_groups": "num_groups",
}


def _plain(cfg: Any) -> dict[str, Any]:
    if hasattr(cfg, "items") and not isinstance(cfg, dict):
        try:  # OmegaConf DictConfig
            from omegaconf import OmegaConf  # type: ignore[import-not-found]

            return OmegaConf.to_container(cfg, resolve=True)
        except ImportError:
            return {k: _plain(v) if hasattr(v, "items") else v for k, v in cfg.items()}
    return dict(cfg)


def config_from_official(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Official PatchVolume config (``{"model": …, "dataset": …}``, or ``{"cfg": …}``) → our override dict."""
    cfg = _plain(cfg)
    if "cfg" in cfg and "model" not in cfg:
        cfg = _plain(cfg["cfg"])
    if "model" not in cfg:
        raise UserError("official config has no 'model' section (expected config/PatchVolume_*.yaml)")
    model, dataset = dict(cfg["model"]), dict(cfg.get("dataset") or {})
    ae: dict[str, Any] = {v: model[k] for k, v in _MODEL_KEYS.items() if k in model}
    if "downsample" in model:
        ds = model["downsample"]
        ds = list(ds) if isinstance(ds, (list, tuple)) else [ds] * 3
        if len(set(ds)) != 1:
            raise UserError(f"official downsample {ds} is anisotropic; only [d, d, d] is supported")
        ae["downsample"] = int(ds[0])
    if "no_random_restart" in model:
        ae["random_restart"] = not bool(model["no_random_restart"])
    if model.get("perceptual_3d"):
        raise UserError("perceptual_3d (MedicalNet) is not implemented; set it to False")
    if "image_channels" in dataset:
        ae["image_channels"] = int(dataset["image_channels"])
    stage = int(model.get("stage", 1))
    st: dict[str, Any] = {}
    if "lr" in model:
        st["lr"] = float(model["lr"])
    if "batch_size" in model:
        st["batch_size"] = int(model["batch_size"])
    if "discriminator_iter_start" in model:
        st["disc_start"] = int(model["discriminator_iter_start"])
    if "max_steps" in model:
        st["steps"] = int(model["max_steps"])
    if "precision" in model:
        prec = str(model["precision"])
        st["amp"] = "bf16" if prec.startswith("bf16") else "fp16" if prec.startswith("16") else "off"
    ae[f"stage{stage}"] = st
    out: dict[str, Any] = {"ae": ae}
    if "patch_size" in dataset:
        out["data"] = {"patch": int(dataset["patch_size"])}
    if "seed" in model:
        out["run"] = {"seed": int(model["seed"])}
    return out


def config_from_official_to_config(cfg: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> Config:
    return config_from_dict(
        Config, merge_dicts(dict(base or {}), config_from_official(cfg)), "official config"
    )


def convert_state_dict(
    sd: Mapping[str, Any],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]]]:
    """Split an official Lightning state dict into our ``ae`` / ``disc`` state dicts.

    Returns ``(states, report)`` with ``report = {"ignored": […], "unmapped": […]}``.
    """
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    ae: dict[str, torch.Tensor] = {}
    disc: dict[str, torch.Tensor] = {}
    ignored, unmapped = [], []
    for k, v in sd.items():
        if k.startswith(AE_PREFIXES):
            ae[k] = v
        elif k.startswith(DISC_PREFIX):
            disc[k[len(DISC_PREFIX) :]] = v
        elif k.startswith(IGNORED_PREFIXES):
            ignored.append(k)
        else:
            unmapped.append(k)
    if ae:
        ae["codebook.initialized"] = torch.tensor(True)
    return {"ae": ae, "disc": disc}, {"ignored": ignored, "unmapped": unmapped}


def load_official(ckpt_path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """The official file, read without unpickling code (``weights_only`` + a small allow-list); a file that
    needs more (e.g. Lightning hyper-parameters as omegaconf objects) is refused unless ``trust_pickle``."""
    from medsynth_core.checkpoint import load_official_file

    return load_official_file(ckpt_path, trust_pickle=trust_pickle)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    official_config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Convert an official ``.ckpt`` to a medsynth checkpoint (``kind=meddiffusion3d-ae``); official BiFlowNet
    checkpoints are recognised and go to :func:`convert_biflownet_checkpoint`."""
    raw = load_official(src, trust_pickle)
    if is_official_biflownet(raw):
        return convert_biflownet_checkpoint(src, dst, official_config, overrides, raw=raw)
    cfg_src = None
    if official_config is not None:
        import yaml

        cfg_src = yaml.safe_load(Path(official_config).read_text())
    elif isinstance(raw, Mapping) and "hyper_parameters" in raw:  # Lightning save_hyperparameters()
        hp = raw["hyper_parameters"]
        cfg_src = hp.get("cfg", hp) if isinstance(hp, Mapping) else None
    if cfg_src is None:
        raise UserError(
            f"{src}: no hyper_parameters in the checkpoint; pass --official-config "
            "config/PatchVolume_{4x,8x}.yaml used to train it"
        )
    cfg = config_from_official_to_config(cfg_src)
    states, report = convert_state_dict(raw)
    if report["unmapped"]:
        print(f"unmapped keys ({len(report['unmapped'])}): {', '.join(report['unmapped'][:20])}")
    if report["ignored"]:
        print(f"ignored {len(report['ignored'])} frozen LPIPS keys (perceptual_loss.*)")
    ae, disc = build_autoencoder(cfg.ae), build_discriminator(cfg.ae)
    from medsynth_core.checkpoint import load_module_state

    load_module_state(ae, states["ae"], source=f"{src} [autoencoder]")
    if states["disc"]:
        load_module_state(disc, states["disc"], source=f"{src} [discriminator]")
    models = {"ae": ae, "disc": disc}
    step = int(raw.get("global_step", 0)) if isinstance(raw, Mapping) else 0
    ckpt = build_checkpoint(
        kind=KIND,
        step=step,
        models=models,
        config=config_to_dict(cfg),
        include_rng=False,
        extra={"stage": int(ae.stage), "converted_from": str(src), **report},
    )
    atomic_torch_save(ckpt, dst)
    return {"dst": str(dst), "step": step, **{k: len(v) for k, v in report.items()}}


# ------------------------------------------------------------------------------------------- BiFlowNet
BIFLOWNET_KIND = "meddiffusion3d-biflownet"


def is_official_biflownet(raw: Any) -> bool:
    """Official BiFlowNet training checkpoints hold ``model`` (a state dict with ``init_conv.weight``)."""
    if not isinstance(raw, Mapping):
        return False
    sd = raw["model"] if isinstance(raw.get("model"), Mapping) else raw
    return any(str(k).removeprefix("module.") == "init_conv.weight" for k in sd)


def biflownet_config_from_official(
    out: Mapping[str, Any], constructor: Mapping[str, Any] | None = None, overrides: list[str] | None = None
) -> Config:
    """Our :class:`Config` for a converted BiFlowNet: the official constructor kwargs (a fixture/``BiFlowNet(...)``
    call, when given) or the training ``args``, then ``key=value`` overrides."""
    from medsynth_core.config import parse_overrides


    kw = dict(from_official_kwargs(**constructor) if constructor else out["model_kwargs"])
    sv = kw.get("sub_volume")
    if isinstance(sv, (tuple, list)):
        if len(set(sv)) != 1:
            raise UserError(f"anisotropic sub-volume {tuple(sv)} is not supported by the config (one edge)")
        kw["sub_volume"] = int(sv[0])
    kw = {k: list(v) if isinstance(v, tuple) else v for k, v in kw.items()}
    d = out["diffusion_kwargs"]
    data = merge_dicts(
        config_to_dict(Config()),
        {"biflownet": kw, "diffusion": {"T": int(d["timesteps"]), "loss": str(d["loss"])}},
    )
    data = merge_dicts(data, parse_overrides(overrides or []))
    return config_from_dict(Config, data, source="converted official BiFlowNet")


def convert_biflownet_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    official_config: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    raw: Any = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Official BiFlowNet checkpoint (``{"model", "ema", "args", ...}``, read safely by :func:`load_official`) → a ``meddiffusion3d train``-style checkpoint (model + EMA; ``generate`` uses the EMA).

    ``official_config``: a JSON/YAML file of official ``BiFlowNet(...)`` constructor kwargs, for models whose sizes
    differ from the training script's defaults (heads, groups, sub-volume); ``overrides``: ``biflownet.k=v``."""
    import json

    import yaml

    from .config import build_biflownet
    from .diffusion import ModelEMA

    raw = load_official(src, trust_pickle) if raw is None else raw
    out = convert_official_biflownet_checkpoint(raw)
    ctor = None
    if official_config is not None:
        text = Path(official_config).read_text()
        ctor = json.loads(text) if str(official_config).endswith(".json") else yaml.safe_load(text)
        ctor = ctor.get("constructor", ctor)
    cfg = biflownet_config_from_official(out, ctor, overrides)
    if out["unmapped"]:
        print(f"unmapped keys ({len(out['unmapped'])}): {', '.join(out['unmapped'][:20])}")
    from medsynth_core.checkpoint import load_module_state

    try:
        model = build_biflownet(cfg.biflownet)
        load_module_state(model, out["model"], source=f"{src} [model]")
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{src}: the weights do not fit BiFlowNet({cfg.biflownet}) built from the checkpoint's args ({exc}); "
            "pass --official-config with the official BiFlowNet(...) constructor kwargs, or biflownet.k=v overrides"
        ) from exc
    ema = ModelEMA(model, cfg.diffusion.ema, cfg.diffusion.ema_every, cfg.diffusion.ema_start)
    if out["ema"] is not None:
        load_module_state(ema.module, out["ema"], source=f"{src} [ema]")
    step = int(raw.get("step", raw.get("train_steps", 0)) or 0) if isinstance(raw, Mapping) else 0
    ckpt = build_checkpoint(
        kind=BIFLOWNET_KIND,
        step=step,
        models={"model": model},
        emas={"ema": ema},
        config=config_to_dict(cfg),
        include_rng=False,
        extra={"converted_from": str(src), "unmapped": out["unmapped"], "has_ema": out["ema"] is not None},
    )
    atomic_torch_save(ckpt, dst)
    return {
        "dst": str(dst),
        "kind": BIFLOWNET_KIND,
        "step": step,
        "unmapped": len(out["unmapped"]),
        "ema": out["ema"] is not None,
    }


# ------------------------------------------------------------------------- official BiFlowNet key mapping (spec §2)
_OFFICIAL_ALIASES = {
    # argparse names of train_BiFlowNet_SingleRes.py (dashes become underscores)
    "model_dim": "dim",
    "volume_channels": "channels",
    "num_classes": "cond_classes",
    "use_attn": "use_sparse_linear_attn",
    "num_dit": "num_mid_DiT",
}


def from_official_kwargs(**kw: Any) -> dict[str, Any]:
    """Map official ``BiFlowNet(...)`` constructor (or training-script argparse) arguments to ours.

    The official forward tiles DiT features with ``8·latent // vq_size`` sub-volumes per axis, which equals our
    ``latent // sub_volume`` only when ``vq_size == 8·sub_volume`` (spec §2, "Shape constraints"); other
    combinations are rejected.
    """
    kw = {k.replace("-", "_"): v for k, v in kw.items()}
    for a, b in _OFFICIAL_ALIASES.items():
        if a in kw:
            kw.setdefault(b, kw.pop(a))
    known = {
        "dim",
        "dim_mults",
        "channels",
        "init_kernel_size",
        "cond_classes",
        "learn_sigma",
        "use_sparse_linear_attn",
        "vq_size",
        "num_mid_DiT",
        "patch_size",
        "attn_heads",
        "resnet_groups",
        "DiT_num_heads",
        "mlp_ratio",
        "sub_volume_size",
        "res_condition",
        "init_dim",
    }
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ValueError(f"unknown official BiFlowNet arguments: {unknown}")
    dim = int(kw.get("dim", 72))
    if kw.get("init_dim") not in (None, dim):
        raise ValueError("official init_dim != dim cannot run (the head concatenates the stem output)")
    sub = _triple(kw.get("sub_volume_size", (8, 8, 8)), "sub_volume_size")
    vq = kw.get("vq_size", 64)
    if vq is not None and any(int(vq) != 8 * s for s in sub):
        raise ValueError(
            f"official vq_size={vq} with sub_volume_size={sub} does not tile the latent "
            f"(the official forward needs vq_size == 8·sub_volume_size)"
        )
    return dict(
        channels=int(kw.get("channels", 3)),
        dim=dim,
        dim_mults=tuple(int(m) for m in kw.get("dim_mults", (1, 1, 2, 4, 8))),
        use_attn=tuple(int(a) for a in kw.get("use_sparse_linear_attn", (0, 0, 0, 1, 1))),
        attn_heads=int(kw.get("attn_heads", 8)),
        attn_dim_head=32,
        resnet_groups=int(kw.get("resnet_groups", 24)),
        classes=(int(kw["cond_classes"]) if kw.get("cond_classes") else None),
        res_condition=bool(kw.get("res_condition", True)),
        sub_volume=sub,
        dit_patch=int(kw.get("patch_size", 2)),
        dit_heads=int(kw.get("DiT_num_heads", 8)),
        mlp_ratio=float(kw.get("mlp_ratio", 4)),
        num_mid_dit=int(kw.get("num_mid_DiT", 1)),
        learn_sigma=bool(kw.get("learn_sigma", False)),
        init_kernel_size=int(kw.get("init_kernel_size", 3)),
    )


def _map_resblock(rest: str) -> str | None:
    table = {
        "mlp.1.weight": "film.weight",
        "mlp.1.bias": "film.bias",
        "block1.proj.weight": "conv1.weight",
        "block1.proj.bias": "conv1.bias",
        "block1.norm.weight": "norm1.weight",
        "block1.norm.bias": "norm1.bias",
        "block2.proj.weight": "conv2.weight",
        "block2.proj.bias": "conv2.bias",
        "block2.norm.weight": "norm2.weight",
        "block2.norm.bias": "norm2.bias",
        "res_conv.weight": "skip.weight",
        "res_conv.bias": "skip.bias",
    }
    return table.get(rest)


def _map_attention(rest: str) -> str | None:
    table = {
        "fn.fn.to_qkv.weight": "to_qkv.weight",
        "fn.fn.to_out.weight": "to_out.weight",
        "fn.fn.to_out.bias": "to_out.bias",
        "fn.norm.gamma": "gain",
    }
    return table.get(rest)


def _map_dit(rest: str) -> str | None:
    if rest.startswith(("attn.", "mlp.", "skip_linear.")):
        return rest
    if rest.startswith("adaLN_modulation.1."):
        return "ada_ln." + rest.split(".", 2)[2]
    if rest.startswith("linear."):
        return rest
    return None


def official_key_to_ours(key: str) -> str | None:
    """Our name of one official BiFlowNet state-dict key, or ``None`` when it has no counterpart."""
    simple = {
        "pos_embed": "pos_embed",
        "init_conv.weight": "stem.weight",
        "init_conv.bias": "stem.bias",
        "cond_emb.weight": "class_embed.weight",
        "x_embedder.proj.weight": "patch_embed.weight",
        "x_embedder.proj.bias": "patch_embed.bias",
        "final_conv.1.weight": "head_out.weight",
        "final_conv.1.bias": "head_out.bias",
    }
    if key in simple:
        return simple[key]
    parts = key.split(".")
    if parts[0] in ("time_mlp", "res_mlp"):
        return key
    if parts[0] in ("IntraPatchFlow_input", "IntraPatchFlow_output"):
        ours = "dit_in" if parts[0].endswith("input") else "dit_out"
        sub = {"0": "block", "1": "final"}.get(parts[2])
        mapped = _map_dit(".".join(parts[3:]))
        return f"{ours}.{parts[1]}.{sub}.{mapped}" if sub and mapped else None
    if parts[0] == "IntraPatchFlow_mid":
        mapped = _map_dit(".".join(parts[2:]))
        return f"dit_mid.{parts[1]}.{mapped}" if mapped else None
    if parts[0] in ("downs", "ups"):
        slot, rest = parts[2], ".".join(parts[3:])
        if slot in ("0", "2"):
            m = _map_resblock(rest)
            name = "res1" if slot == "0" else "res2"
        elif slot in ("1", "3"):
            m = _map_attention(rest)
            name = "attn1" if slot == "1" else "attn2"
        elif slot == "4":
            m = rest if rest in ("weight", "bias") else None
            name = "resample"
        else:
            return None
        return f"{parts[0]}.{parts[1]}.{name}.{m}" if m else None
    if parts[0] in ("mid_block1", "mid_block2"):
        m = _map_resblock(".".join(parts[1:]))
        return f"mid_res{parts[0][-1]}.{m}" if m else None
    if parts[0] == "mid_spatial_attn":
        m = _map_attention(".".join(parts[1:]))
        return f"mid_attn.{m}" if m else None
    if parts[0] == "final_conv" and parts[1] == "0":
        m = _map_resblock(".".join(parts[2:]))
        return f"head_res.{m}" if m else None
    return None


def convert_official_biflownet(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Official ``BiFlowNet`` state dict (optionally under ``model``/``ema``; ``module.`` prefixes stripped) →
    (our state dict, official keys without a counterpart). Values are passed through unchanged (shapes and
    layouts are identical), so the function also works on shape lists."""
    out: dict[str, Any] = {}
    unmapped: list[str] = []
    for k, v in state_dict.items():
        key = k[len("module.") :] if k.startswith("module.") else k
        ours = official_key_to_ours(key)
        if ours is None:
            unmapped.append(k)
        else:
            out[ours] = v
    return out, unmapped


# argparse defaults of train/train_BiFlowNet_SingleRes.py (the released checkpoints store these ``args``)
OFFICIAL_ARGPARSE_DEFAULTS: dict[str, Any] = dict(
    model_dim=72,
    dim_mults=[1, 1, 2, 4, 8],
    use_attn=[0, 0, 0, 1, 1],
    volume_channels=8,
    num_classes=7,
    num_dit=1,
    vq_size=64,
    patch_size=1,
    timesteps=1000,
    loss_type="l1",
)


def official_args_to_kwargs(args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Official training-script ``args`` (argparse Namespace or mapping; missing entries take the script's
    defaults) → (our ``BiFlowNet`` kwargs, our ``GaussianDiffusion`` kwargs ``timesteps``/``loss``)."""
    a = dict(vars(args)) if not isinstance(args, Mapping) else dict(args)
    a = {k.replace("-", "_"): v for k, v in a.items()}
    g = {k: a.get(k, d) for k, d in OFFICIAL_ARGPARSE_DEFAULTS.items()}
    model = from_official_kwargs(
        dim=g["model_dim"],
        dim_mults=g["dim_mults"],
        channels=g["volume_channels"],
        init_kernel_size=3,
        cond_classes=g["num_classes"],
        learn_sigma=False,
        use_sparse_linear_attn=g["use_attn"],
        vq_size=g["vq_size"],
        num_mid_DiT=g["num_dit"],
        patch_size=g["patch_size"],
    )
    return model, {"timesteps": int(g["timesteps"]), "loss": str(g["loss_type"])}


def convert_official_biflownet_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """An official BiFlowNet training checkpoint (``{"model", "ema", "args", ...}``) or a bare state dict →
    ``{"model": sd, "ema": sd | None, "model_kwargs", "diffusion_kwargs", "unmapped": [...]}``. ``unmapped`` lists
    the official keys without a counterpart (prefixed ``model.`` / ``ema.``); optimizer/scaler state is dropped."""
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        model_sd, ema_sd = ckpt["model"], ckpt.get("ema")
    else:
        model_sd, ema_sd = ckpt, None
    model, un_m = convert_official_biflownet(model_sd)
    ema, un_e = convert_official_biflownet(ema_sd) if ema_sd is not None else (None, [])
    if "args" in ckpt:
        model_kwargs, diffusion_kwargs = official_args_to_kwargs(ckpt["args"])
    else:
        model_kwargs, diffusion_kwargs = official_args_to_kwargs({})
    return {
        "model": model,
        "ema": ema,
        "model_kwargs": model_kwargs,
        "diffusion_kwargs": diffusion_kwargs,
        "unmapped": [f"model.{k}" for k in un_m] + [f"ema.{k}" for k in un_e],
    }

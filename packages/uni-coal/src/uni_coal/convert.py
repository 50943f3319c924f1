"""Official UniCOAL constructor arguments / config nodes / checkpoints -> this package (``convert-official``).

Our modules use the official parameter names, so a state dict maps one-to-one; the converter casts to
float32, drops wrappers (``module.``, ``_orig_mod.``) and reports every key it could not place.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medsynth_core.cli import UserError

from .config import DiscriminatorConfig, GeneratorConfig

_IGNORED_SYNTH = {"freeze_layer", "coord_conv", "use_radial_filters"}


def generator_config_from_official(ctor: Mapping[str, Any]) -> GeneratorConfig:
    """Map ``UniCOALGenerator(**ctor)`` (or the ``model.G`` config node) onto :class:`GeneratorConfig`."""
    sk = dict(ctor.get("synthesis_kwargs", {}))
    mk = dict(ctor.get("mapping_kwargs", {}))
    ek = dict(sk.get("encoder_kwargs", {}))
    emk = dict(ek.get("mapping_kwargs", {}))
    if sk.get("use_radial_filters", False):
        raise UserError("official config uses radial filters (StyleGAN3-R); only the T config is supported")
    if sk.get("coord_conv", False) or sk.get("freeze_layer", -1) not in (-1, 0, None):
        raise UserError("official config uses coord_conv/freeze_layer, which the paper configs do not use")
    if ek.get("name", "ReversedEncoder") != "ReversedEncoder":
        raise UserError(f"official encoder '{ek.get('name')}' is not supported (only ReversedEncoder)")
    if mk.get("posi_emb", "linear") != "linear" or emk.get("posi_emb", "linear") != "linear":
        raise UserError("only posi_emb='linear' (the paper setting) is supported")
    z_dim = int(ctor["z_dim"])
    kw: dict[str, Any] = dict(
        z_dim=z_dim,
        w_dim=int(ctor["w_dim"]),
        c_dim=int(ctor.get("c_dim", 0)),
        index_dim=int(ctor.get("index_dim", 0)),
        img_resolution=int(ctor["img_resolution"]),
        img_channels_in=int(ctor["img_channels_in"]),
        img_channels_out=int(ctor["img_channels_out"]),
        mapping_layers=int(mk.get("num_layers", 2)),
        mapping_embed=mk.get("embed_features"),
        mapping_lr_mult=float(mk.get("lr_multiplier", 0.01)),
        enc_modulated=bool(ek.get("modulated", False)),
        enc_dropout=float(ek.get("dropout_rate", 0.5)),
        enc_w_dim=int(emk.get("w_dim", 512)),
        enc_embed=emk.get("embed_features"),
        enc_mapping_layers=int(emk.get("num_layers", 2)),
    )
    for key in (
        "channel_base",
        "channel_max",
        "num_layers",
        "num_critical",
        "margin_size",
        "skip_resolution",
        "conv_kernel",
        "filter_size",
        "lrelu_upsampling",
    ):
        if key in sk:
            kw[key] = int(sk[key])
    for key in ("first_cutoff", "first_stopband", "last_stopband_rel", "output_scale", "magnitude_ema_beta"):
        if key in sk:
            kw[key] = float(sk[key])
    if "conv_clamp" in sk:
        kw["conv_clamp"] = None if sk["conv_clamp"] is None else float(sk["conv_clamp"])
    if "cond_mod" in sk:
        kw["cond_mod"] = bool(sk["cond_mod"])
    if kw["enc_modulated"]:
        enc_c = int(emk.get("c_dim", kw["c_dim"]))
        if enc_c != kw["c_dim"]:
            raise UserError(
                f"official config: encoder mapping c_dim {enc_c} differs from model.G.c_dim {kw['c_dim']}; "
                "set both to the number of target modalities (len(raw_internal_path_out))"
            )
        # The official BraTS/ADNI configs give only the encoder mapping net index_dim 1 (model.G.index_dim
        # stays 0, Q8). Our three mapping nets share one index_dim: take the larger (delta fed everywhere,
        # spec §1/Q8); official weights without a delta embedding are padded exactly (pad_index_embedding).
        kw["index_dim"] = max(kw["index_dim"], int(emk.get("index_dim", kw["index_dim"])))
    return GeneratorConfig(**kw)


def discriminator_config_from_official(ctor: Mapping[str, Any]) -> DiscriminatorConfig:
    mk = dict(ctor.get("mapping_kwargs", {}))
    ek = dict(ctor.get("epilogue_kwargs", {}))
    # num_fp16_res only changes dtypes on CUDA; the maths is the same, so it is not mapped
    return DiscriminatorConfig(
        c_dim=int(ctor.get("c_dim", 0)),
        index_dim=int(ctor.get("index_dim", 0)),
        img_resolution=int(ctor["img_resolution"]),
        img_channels=int(ctor["img_channels"]),
        channel_base=int(ctor.get("channel_base", 32768)),
        channel_max=int(ctor.get("channel_max", 512)),
        cmap_dim=ctor.get("cmap_dim"),
        mapping_layers=int(mk.get("num_layers", 8)),
        mapping_embed=int(mk["embed_features"]) if mk.get("embed_features") is not None else 0,
        mbstd_group=int(ek.get("mbstd_group_size", 4)),
        mbstd_channels=int(ek.get("mbstd_num_channels", 1)),
        conv_clamp=None if ctor.get("conv_clamp") is None else float(ctor["conv_clamp"]),
    )


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def pad_index_embedding(
    official: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official mapping nets built with ``index_dim=0`` (BraTS/ADNI ``model.G``, BraTS ``model.D``) -> ours
    with ``index_dim=1``, computing the same function: the delta embedding gets zero weight and bias, so its
    normalised output is exactly 0 for every delta, and ``fc0`` gets zero columns for it, its official columns
    rescaled by sqrt(new_fan_in / old_fan_in) because equalised LR scales weights by 1/sqrt(fan_in) at run time.
    Returns (official state with the padded entries, the prefixes padded)."""
    out = {_strip(k): v for k, v in official.items()}
    padded = []
    for key in own:
        if not key.endswith("embed_index.weight"):
            continue
        prefix = key[: -len("embed_index.weight")]
        fc0 = prefix + "fc0.weight"
        if key in out or fc0 not in out or fc0 not in own:
            continue
        w_off, w_own = out[fc0], own[fc0]
        embed = own[key].shape[0]
        if w_off.shape[0] != w_own.shape[0] or w_off.shape[1] + embed != w_own.shape[1]:
            continue
        w = torch.zeros(w_own.shape, dtype=w_off.dtype)
        w[:, : w_off.shape[1]] = w_off * (w_own.shape[1] / w_off.shape[1]) ** 0.5
        out[fc0] = w
        out[key] = torch.zeros(own[key].shape, dtype=w_off.dtype)
        out[prefix + "embed_index.bias"] = torch.zeros(
            own[prefix + "embed_index.bias"].shape, dtype=w_off.dtype
        )
        padded.append(prefix or "<root>")
    return out, padded


def convert_state_dict(
    official: Mapping[str, torch.Tensor], module: torch.nn.Module, padded: list[str] | None = None
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Returns (state dict for ``module``, unmapped official keys, module keys left missing). Mapping nets
    without a delta input are padded to ours (:func:`pad_index_embedding`); their prefixes go to ``padded``."""
    own = module.state_dict()
    official, pads = pad_index_embedding(official, own)
    if padded is not None:
        padded.extend(pads)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for k, v in official.items():
        key = _strip(k)
        if key in own and tuple(own[key].shape) == tuple(v.shape):
            out[key] = v.detach().to(own[key].dtype)
        else:
            unmapped.append(k)
    missing = [k for k in own if k not in out]
    return out, unmapped, missing


def _find_state(obj: Any, names: tuple[str, ...]) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, Mapping):
        for n in names:
            if n in obj:
                v = obj[n]
                if isinstance(v, torch.nn.Module):
                    return v.state_dict()
                if isinstance(v, Mapping) and "state_dict" in v and isinstance(v["state_dict"], Mapping):
                    return v["state_dict"]
                if isinstance(v, Mapping):
                    return v
    return None


def _harmonise(cfg, have_g: bool, have_d: bool) -> None:
    """Make the rest of the config agree with networks built from official constructor arguments."""
    g, d = cfg.generator, cfg.discriminator
    if have_g and not have_d:
        d.c_dim, d.index_dim, d.img_resolution = g.c_dim, g.index_dim, g.img_resolution
        d.img_channels = g.img_channels_in + g.img_channels_out
    c_dim = g.c_dim if have_g else d.c_dim
    if have_d and not have_g:
        g.c_dim, g.index_dim, g.img_resolution = d.c_dim, d.index_dim, d.img_resolution
    g.index_dim = d.index_dim = max(g.index_dim, d.index_dim)  # one index_dim for all nets (padded weights)
    if len(cfg.data.modalities) != c_dim:
        cfg.data.modalities = ("target",) if c_dim == 1 else tuple(f"m{i}" for i in range(c_dim))
        cfg.data.sources = cfg.data.modalities
    cfg.data.size = g.img_resolution


def convert_official(
    src: str | Path,
    dst: str | Path,
    config: str | Path | None = None,
    official_config: str | Path | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Convert an official checkpoint (``latest_net_G.pth`` state dict, a dict with G/D/G_ema, or a fixture
    holding ``generator``/``discriminator`` entries with ``constructor``) into our checkpoint format."""
    from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint, load_official_file
    from medsynth_core.config import config_to_dict, load_config

    from .config import Config
    from .discriminator import CoModDiscriminator
    from .model import UniCOALGenerator

    src = Path(src)
    if not src.is_file():
        raise UserError(f"{src}: file not found")
    obj = load_official_file(src, trust_pickle=trust_pickle)  # weights_only unless trusted (issue 18)
    if official_config is not None:
        cfg = config_from_official_yaml(official_config)
    else:
        cfg = load_config(Config, config) if config is not None else Config()
    gctor = (
        obj.get("generator", {}).get("constructor")
        if isinstance(obj, Mapping) and isinstance(obj.get("generator"), Mapping)
        else None
    )
    dctor = (
        obj.get("discriminator", {}).get("constructor")
        if isinstance(obj, Mapping) and isinstance(obj.get("discriminator"), Mapping)
        else None
    )
    if gctor is not None:
        cfg.generator = generator_config_from_official(gctor)
    if dctor is not None:
        cfg.discriminator = discriminator_config_from_official(dctor)
    if gctor is not None or dctor is not None:
        _harmonise(cfg, gctor is not None, dctor is not None)
    g_state = _find_state(obj, ("G_ema", "netG_ema", "generator", "G", "netG"))
    d_state = _find_state(obj, ("D", "netD", "discriminator"))
    if (
        g_state is None
        and isinstance(obj, Mapping)
        and any(_strip(str(k)).startswith("synthesis.") for k in obj)
    ):
        g_state = obj
    elif (
        g_state is None
        and d_state is None
        and isinstance(obj, Mapping)
        and any(_strip(str(k)).startswith("b4.") for k in obj)
    ):
        d_state = obj  # a bare discriminator state dict (latest_net_D.pth)
    if g_state is None and d_state is None:
        raise UserError(
            f"{src}: no generator or discriminator weights found (expected a state dict with "
            "'synthesis.*'/'mapping.*' keys, or entries G/G_ema/D)"
        )
    report: dict[str, Any] = {"src": str(src), "dst": str(dst)}
    models: dict[str, torch.nn.Module] = {}
    for name, state, build in (
        ("G_ema", g_state, lambda: UniCOALGenerator(cfg.generator)),
        ("D", d_state, lambda: CoModDiscriminator(cfg.discriminator)),
    ):
        if state is None:
            continue
        module = build()
        padded: list[str] = []
        sd, unmapped, missing = convert_state_dict(state, module, padded)
        if missing:
            raise UserError(
                f"{src}: {name} weights do not fit the config (missing {len(missing)} keys, e.g. "
                f"{missing[:5]}; unmapped {unmapped[:5]}); pass --config with the training config"
            )
        module.load_state_dict(sd)
        models[name] = module
        report[f"{name}_unmapped"] = unmapped
        if padded:
            report[f"{name}_padded_index_embedding"] = padded
        report[f"{name}_params"] = sum(p.numel() for p in module.parameters())
    if "G_ema" in models:
        models["G"] = models["G_ema"]
    ckpt = build_checkpoint(
        kind="uni-coal",
        step=0,
        models=models,
        config=config_to_dict(cfg),
        include_rng=False,
        extra={"converted_from": str(src)},
    )
    atomic_torch_save(ckpt, dst)
    return report


# ------------------------------------------------------------------------------ official YAML files
# UniCOALModel.modify_commandline_options defaults (unicoal_model.py L53-127), under the YAML's model.G / model.D
OFFICIAL_G_DEFAULTS: dict[str, Any] = {
    "z_dim": 512,
    "w_dim": 512,
    "c_dim": 0,
    "index_dim": 0,
    "img_resolution": 256,
    "img_channels_in": 1,
    "img_channels_out": 1,
    "synthesis_kwargs": {
        "channel_base": 16384,
        "channel_max": 512,
        "num_layers": 14,
        "num_critical": 2,
        "first_cutoff": 2,
        "first_stopband": 2**2.1,
        "last_stopband_rel": 2**0.3,
        "margin_size": 10,
        "output_scale": 0.25,
        "skip_resolution": 128,
        "freeze_layer": -1,
        "coord_conv": False,
        "conv_kernel": 3,
        "filter_size": 6,
        "lrelu_upsampling": 2,
        "use_radial_filters": False,
        "conv_clamp": 256,
        "magnitude_ema_beta": 0.5 ** (16 / (20 * 1e3)),
        "cond_mod": True,
        "encoder_kwargs": {
            "name": "ReversedEncoder",
            "dropout_rate": 0.5,
            "modulated": False,
            "mapping_kwargs": {
                "c_dim": 0,
                "index_dim": 0,
                "w_dim": 512,
                "embed_features": 512,
                "num_layers": 2,
                "posi_emb": "linear",
            },
        },
    },
    "mapping_kwargs": {"num_layers": 8, "posi_emb": "linear"},
}
OFFICIAL_D_DEFAULTS: dict[str, Any] = {
    "channel_base": 16384,
    "num_fp16_res": 0,
    "conv_clamp": None,
    "channel_max": 512,
    "c_dim": 0,
    "index_dim": 0,
    "img_resolution": 256,
    "img_channels": 2,
    "mapping_kwargs": {"num_layers": 8, "posi_emb": "linear", "embed_features": 512},
    "epilogue_kwargs": {"mbstd_group_size": 16},
}


def _deep_merge(base: Mapping[str, Any], upd: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def read_official_yaml(path: str | Path) -> dict[str, Any]:
    """An official config file with its ``_BASE_`` chain merged (child keys win)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: official config file not found (its _BASE_ chain must be beside it)")
    data = yaml.safe_load(path.read_text()) or {}
    base = data.pop("_BASE_", None)
    if base:
        data = _deep_merge(read_official_yaml(path.parent / base), data)
    return data


def official_yaml_to_config(path: str | Path):
    """Official YAML (e.g. ``configs/ixi/multitask/allrand/UniCOAL/6_final.yml``, BraTS ``final.yml``, ADNI
    ``cmsr_sam.yml``/``sr_5_sam.yml``) -> (our validated :class:`Config`, notes on what was changed)."""
    from medsynth_core.config import ConfigError, config_from_dict, config_to_dict

    from .config import Config

    node = read_official_yaml(path)
    model = node.get("model", {})
    if model.get("name", "unicoal") != "unicoal":
        raise UserError(f"{path}: model.name is '{model.get('name')}', not 'unicoal' (a baseline's config?)")
    notes: list[str] = []
    cfg = Config()
    g_node = _deep_merge(OFFICIAL_G_DEFAULTS, model.get("G", {}))
    g_index = int(g_node.get("index_dim", 0))
    cfg.generator = generator_config_from_official(g_node)
    cfg.discriminator = discriminator_config_from_official(
        _deep_merge(OFFICIAL_D_DEFAULTS, model.get("D", {}))
    )
    g, d = cfg.generator, cfg.discriminator
    if g.index_dim != g_index:
        notes.append(
            f"model.G.index_dim {g_index} -> {g.index_dim} (the encoder mapping net takes delta; Q8/spec §1: "
            "delta is fed to G too; official weights are padded exactly)"
        )
    if d.index_dim != g.index_dim:
        notes.append(
            f"model.D.index_dim {d.index_dim} -> {max(d.index_dim, g.index_dim)} (one index_dim for all nets)"
        )
        g.index_dim = d.index_dim = max(d.index_dim, g.index_dim)
    loaders, loss, opt = node.get("loaders", {}), node.get("loss", {}), node.get("optimizer", {})
    if "raw_internal_path_out" in loaders:
        cfg.data.modalities = tuple(loaders["raw_internal_path_out"])
    if "raw_internal_path_in" in loaders:
        cfg.data.sources = tuple(loaders["raw_internal_path_in"])
    if "thickness" in loaders:
        cfg.data.thicknesses = tuple(int(t) for t in loaders["thickness"])
    for ours, theirs in (("all_hr", "all_hr"), ("slice_num", "slice_num")):
        if theirs in loaders:
            setattr(cfg.data, ours, loaders[theirs])
    tm = (loaders.get("test") or {}).get("target_modality")
    if tm is not None:  # eval configs: index into raw_internal_path_out (Q9: ours honours it)
        if not 0 <= int(tm) < len(cfg.data.modalities):
            raise UserError(f"{path}: loaders.test.target_modality {tm} is outside raw_internal_path_out")
        cfg.data.fixed_target = cfg.data.modalities[int(tm)]
    if "batch_size" in loaders:
        cfg.train.batch_size = int(loaders["batch_size"])
    for ours, theirs in (
        ("lambda_l1", "lambda_L1"),
        ("lambda_sam", "lambda_sam"),
        ("lambda_r1", "lambda_r1"),
        ("blur_init_sigma", "blur_init_sigma"),
    ):
        if theirs in loss:
            setattr(cfg.loss, ours, float(loss[theirs]))
    if "blur_fade_kimg" in loss:  # BraTS/ADNI set the key twice; YAML keeps the later value (200)
        cfg.loss.blur_fade_images = int(float(loss["blur_fade_kimg"]) * 1000)
    if "lr_G" in opt:
        cfg.optim.lr_g = float(opt["lr_G"])
    if "lr_D" in opt:
        cfg.optim.lr_d = float(opt["lr_D"])
    sched = node.get("scheduler", {})
    for key in ("n_epochs", "n_epochs_decay"):
        if key in sched:
            setattr(cfg.optim, key, int(sched[key]))
    cfg.train.epochs = cfg.optim.n_epochs + cfg.optim.n_epochs_decay
    ema = sched.get("ema", {})
    if "ema_kimgs" in ema:
        cfg.optim.ema_half_life_images = float(ema["ema_kimgs"]) * 1000
    cfg.data.size = cfg.generator.img_resolution
    if "name" in node:
        cfg.run.name = str(node["name"])
    try:  # validate (c_dim vs modalities, D channels, ...)
        return config_from_dict(Config, config_to_dict(cfg), source=str(path)), notes
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def config_from_official_yaml(path: str | Path):
    """Official YAML -> our :class:`Config` (see :func:`official_yaml_to_config`)."""
    return official_yaml_to_config(path)[0]


def convert_official_config(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """``uni-coal convert-config``: write the official YAML (with its ``_BASE_`` chain) as our config file."""
    import yaml

    from medsynth_core.atomic import atomic_write_text
    from medsynth_core.config import config_to_dict

    cfg, notes = official_yaml_to_config(src)
    head = [f"# converted by `uni-coal convert-config` from {Path(src).name}"] + [
        f"# note: {n}" for n in notes
    ]
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write_text(dst, "\n".join(head) + "\n" + body)
    return {"src": str(src), "dst": str(dst), "name": cfg.run.name, "notes": notes}

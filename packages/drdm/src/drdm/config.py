"""Typed config of the drdm package (spec sections 7, 8, 13) and the mapping from the official YAML files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from medsynth_core.config import (
    ConfigError,
    RunSection,
    config_file,
    config_from_dict,
    load_config,
    read_yaml,
    require,
)

Pad = Literal["zeros", "border", "reflection"]
Interp = Literal["bilinear", "bicubic", "nearest"]


@dataclass
class ModelConfig:
    ndims: int = 2  # 2 (CMR slices) or 3 (lung CT volumes)
    num_input_chn: int = 1  # image channels fed to RecResACNet
    time_emb_dim: int = 100  # sinusoid embedding width (official default)
    rec_num: int = 2  # recursive passes R, 2 in training and sampling (spec section 5)

    def __post_init__(self) -> None:
        require(self.ndims in (2, 3), "model.ndims", "must be 2 or 3")
        require(self.rec_num >= 1, "model.rec_num", "must be >= 1")
        require(self.num_input_chn >= 1, "model.num_input_chn", "must be >= 1")


@dataclass
class DiffusionConfig:
    img_size: int = 256  # side S of the square/cubic image, divisible by 8
    timesteps: int = 80  # T (and the rows of the time embedding)
    v_scale: float = 4.0e-5  # sigma of the multi-scale velocity (spec section 2)
    noise_ratio: float = 0.08  # sigma ratio of the perturbation field n
    ctl_sz: int = 64  # control grid C (hard-coded 64 in the official code, Q2)
    max_img_steps: int = 200  # clamp of n_img(t)
    img_pad_mode: Pad = "zeros"  # padding of image warps
    ddf_pad_mode: Pad = "border"  # padding of compositions on the control grid
    padding_mode: Pad = "zeros"  # loss warp p' and phi ⊕ psi at sampling (CMR zeros, LCT border)
    resample_mode: Interp = "bicubic"  # image/label interpolation at sampling only (training: bilinear, Q6)
    geometric_lift: bool = False  # fix of Q1: lift control-grid fields by crop_rate=2 instead of S/C

    def __post_init__(self) -> None:
        require(
            self.img_size >= 8 and self.img_size % 8 == 0, "diffusion.img_size", "must be a multiple of 8"
        )
        require(self.timesteps >= 1, "diffusion.timesteps", "must be >= 1")
        require(self.v_scale > 0, "diffusion.v_scale", "must be > 0")
        require(self.noise_ratio >= 0, "diffusion.noise_ratio", "must be >= 0")
        require(
            self.ctl_sz >= 8 and not self.ctl_sz & (self.ctl_sz - 1),
            "diffusion.ctl_sz",
            "must be a power of two >= 8",
        )


@dataclass
class TrainConfig:
    batch_size: int = 1  # per process; official configs: 1 (the README's 64/4 disagree, Q17)
    lr: float = 1.0e-4  # Adam, default betas/eps, no decay, no scheduler
    steps: int = 1000  # optimiser steps (the official loop counts epochs over the source set)
    # extension: learning-rate schedule over train.steps (constant = official) and linear warm-up steps
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    noise_scale: float = 0.1  # intensity augmentation s (spec section 7)
    geometric_aug: bool = (
        True  # 2D RandomAffine/flip/autocontrast, 3D rotation + resized crop (spec section 7)
    )
    w_dist: float = 1.0  # lambda_1, distance (MRSE) loss
    w_ang: float = 1.0  # lambda_2, angle (NCC) loss
    w_reg: float = 10.0  # lambda_3, regularisation Grad(['l1','negdetj'])
    detj_weight: float = 2.0  # weight of the official "negdetj" term inside L_reg (Q7)
    true_negdetj_weight: float = 0.0  # optional correct negative-Jacobian penalty (Q7 fix; 0 = faithful)
    # eps of the distance loss |p'+U|^2 / (|U|^2 + eps) in the code's x100 units (official 1e-3, tuned at
    # S=256, i.e. |U| ~ 0.08 px); at t=0 (U = 0) the loss is 1e7 |p'|^2, which stalls small demos (README)
    dist_eps: float = 1.0e-3
    # multiplies conv_out's default (PyTorch) initial weights and bias; 1 = official init, whose O(0.1)
    # output fields are ~100x the targets (spec section 7), so short runs first spend steps shrinking them
    out_init_scale: float = 1.0
    # extension (not in the official code): exponential moving average of the weights, updated after every
    # step; 0 = off (official). When on, checkpoints hold it and load_network (augment, evaluate, the demo)
    # uses it
    ema_decay: float = 0.0
    ckpt_every: int = 500
    sample_every: int = 500  # steps between preview PNGs
    log_every: int = 10  # every *_every: 0 = at the last step only (medsynth_core.training.due)
    num_workers: int = 0

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(self.dist_eps > 0, "train.dist_eps", "must be > 0")
        require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1) (0 = no EMA, official)")
        require(self.out_init_scale >= 0, "train.out_init_scale", "must be >= 0")
        require(self.steps >= 1, "train.steps", "must be >= 1")
        require(self.lr_schedule in ("constant", "cosine"), "train.lr_schedule", "must be constant or cosine")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        for key in ("ckpt_every", "sample_every", "log_every"):
            require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0: only at the last step)")


@dataclass
class DataConfig:
    source: Literal["phantom", "folder"] = "phantom"  # training images: core phantoms or a NIfTI folder
    root: str = ""  # folder of NIfTI images (2D slices or 3D volumes) when source=folder
    phantom_count: int = 16  # number of phantom images when source=phantom
    phantom_texture: float = 0.0  # labelled_anatomy(texture=) tissue texture std; 0 = flat tissue (default)
    slices: bool = True  # 2D on 3D files: use every slice along the last disk axis (ACDC layout)
    normalise: Literal["minmax", "none"] = "minmax"  # official CMR loader min-max scales each slice
    remove_background: bool = True  # 2D: official CMR loader's remove_background before min-max (spec 9)
    preprocessed: bool = False  # files already resized/background-removed/scaled (official *_resize folders)
    official: str = ""  # data_name of the official YAML this config was mapped from (cmr | lct), else empty


@dataclass
class AugmentConfig:
    start_noise_step: int = 48  # T' of the first sample (CMR 48, LCT 64)
    noise_step: int = 2  # T' increment every second sample (CMR 2, LCT 1)
    aug_coe: int = 32  # samples per slice / volume
    reverse_from_start: bool = False  # Q3 fix: reverse from T' instead of T-1 (official: always T-1)
    # Q4: 'image' = official (labels warped with the image interpolator: soft, may leave [0, 1]);
    # fixes: 'nearest' (binary one-hot, sums to one), 'linear_onehot_argmax'
    label_mode: Literal["nearest", "linear_onehot_argmax", "image"] = "image"
    keep_affine: bool = True  # Q12 fix: write outputs with the input's affine (official: identity)
    save_ddf: bool = True  # Q12 fix: write phi in voxel units
    save_noisy: bool = True  # also write the randomly deformed input (official NoiseImg files)
    random_permute: bool = (
        True  # official cumulative random flip/transpose before each sample (Q13); false: fix
    )
    batch_size: int = 8  # samples recovered together (no effect on the method; ignored with random_permute)
    seed: int = 0

    def __post_init__(self) -> None:
        require(self.aug_coe >= 1, "augment.aug_coe", "must be >= 1")
        require(self.start_noise_step >= 0, "augment.start_noise_step", "must be >= 0")


@dataclass
class RunConfig(RunSection):
    """``run``: runs/drdm/<name>/ under ``root``; seed, device, threads (1 is much faster on small CPUs, spec
    section 5), checkpoints kept. ``deterministic`` (extension, issue 18): every sample's augmentation, level t
    and forward-process noise come from generators keyed by (seed, step, position in the global batch), so N
    DDP ranks at batch b equal one process at batch N*b and an elastic restart equals an uninterrupted run;
    false = the official batch-wise draws from the per-rank global generators."""

    name: str = "drdm"


@dataclass
class DRDMConfig:
    # issue 17: one vocabulary across the packages (old spellings are refused with the new name)
    RENAMED = {"name": "run.name", "out_dir": "run.root", "train.seed": "run.seed", "train.device": "run.device",
               "train.threads": "run.threads", "train.keep_last": "run.keep_last",
               "train.deterministic": "run.deterministic", "train.batchsize": "train.batch_size",
               "train.image_every": "train.sample_every", "augment.batch": "augment.batch_size"}  # fmt: skip
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        require(
            self.augment.start_noise_step <= self.diffusion.timesteps,
            "augment.start_noise_step",
            f"must be <= diffusion.timesteps ({self.diffusion.timesteps})",
        )


def load(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> DRDMConfig:
    """Our YAML, ``demo``/``paper`` (the packaged configs) or an **official** YAML (``Config/config_*.yaml``)."""
    path = config_file(path, __file__)
    if path is not None and is_official_yaml(read_yaml(path)):
        return from_official(read_yaml(path), overrides, source=str(path))
    return load_config(DRDMConfig, path, list(overrides))


# --------------------------------------------------------------------------------- official configs
OFFICIAL_KEYS = {
    "ndims": ("model", "ndims"),
    "num_input_chn": ("model", "num_input_chn"),
    "img_size": ("diffusion", "img_size"),
    "timesteps": ("diffusion", "timesteps"),
    "v_scale": ("diffusion", "v_scale"),
    "img_pad_mode": ("diffusion", "img_pad_mode"),
    "ddf_pad_mode": ("diffusion", "ddf_pad_mode"),
    "padding_mode": ("diffusion", "padding_mode"),
    "resample_mode": ("diffusion", "resample_mode"),
    "batchsize": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "noise_scale": ("train", "noise_scale"),
    "start_noise_step": ("augment", "start_noise_step"),
    "noise_step": ("augment", "noise_step"),
    "aug_coe": ("augment", "aug_coe"),
}
# official keys without a counterpart here (paths, device, epoch bookkeeping, patient selection)
OFFICIAL_IGNORED = {
    "data_name",
    "net_name",
    "device",
    "epoch",
    "epoch_per_save",
    "patients_list",
    "model_id_str",
    "aug_img_savepath",
    "aug_msk_savepath",
    "aug_ddf_savepath",
}


# the official loaders hard-code their training folders per data_name (Dataloader/dataloader.py):
# cmr: CMR_loader, 2D NIfTI slices, already resized + background-removed + scaled ('resize' in the path);
# lct: LCT_loader, 3D .npy volumes, min-max scaled unless 'process' is in the path.
OFFICIAL_DATA = {
    "cmr": {
        "root": "Data/Src_data/CMR_processed_rmbg_resize",
        "ndims": 2,
        "marker": "resize",
        "slices": True,
    },
    "lct": {"root": "Data/Src_data/CTLung_processed", "ndims": 3, "marker": "process", "slices": False},
}


def is_official_yaml(data: dict[str, Any]) -> bool:
    return "net_name" in data or ("img_size" in data and "model" not in data and "diffusion" not in data)


def official_to_dict(data: dict[str, Any], source: str = "official config") -> dict[str, Any]:
    """Map the keys of an official ``Config/config_*.yaml`` onto our nested config dict."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in OFFICIAL_KEYS:
            sec, name = OFFICIAL_KEYS[key]
            out.setdefault(sec, {})[name] = value
        elif key not in OFFICIAL_IGNORED:
            raise ConfigError(f"{source}: official key '{key}' is unknown; known: {sorted(OFFICIAL_KEYS)}")
    if "data_name" in data:
        out["run"] = {"name": str(data["data_name"])}
    if data.get("net_name", "recresacnet").lower() != "recresacnet":
        raise ConfigError(f"{source}: net_name '{data['net_name']}' is not supported (only recresacnet)")
    # the official sampler uses a 1-D batch; one "epoch" = one pass, we count optimiser steps instead
    return out


def _official_data(data: dict[str, Any], mapped: dict[str, Any], given: dict[str, Any], source: str) -> None:
    """The data keys an official YAML implies (``data_name`` selects the official loader and its folder).

    Overrides (``given``) win; the official "already preprocessed" rule (a marker in the folder name) is
    applied to the final folder unless ``data.preprocessed`` is given. Never falls back to phantoms: an
    unknown ``data_name`` without ``data.root`` is an error."""
    name = str(data.get("data_name", "")).lower()
    d_given = given.get("data", {}) if isinstance(given.get("data"), dict) else {}
    if d_given.get("source") == "phantom":
        return
    spec = OFFICIAL_DATA.get(name)
    if spec is None and not d_given.get("root"):
        raise ConfigError(
            f"{source}: official data_name '{name or '(missing)'}' has no official loader (known: "
            f"{sorted(OFFICIAL_DATA)}); pass data.root=/path/to/training/images (or data.source=phantom)"
        )
    d = mapped.setdefault("data", {})
    d["source"] = "folder"
    if spec is not None:
        nd = int(data.get("ndims", spec["ndims"]))
        if nd != spec["ndims"]:
            raise ConfigError(
                f"{source}: data_name '{name}' is the official {spec['ndims']}D loader but ndims={nd}; "
                f"fix ndims or pass data.root with data.slices"
            )
        d["official"] = name
        d["root"] = spec["root"]
        d["slices"] = spec["slices"]
    root = str(d_given.get("root", d.get("root", "")))
    if "preprocessed" not in d_given and spec is not None:
        d["preprocessed"] = spec["marker"] in root
        if name == "lct":
            d["remove_background"] = False  # the LCT loader has no background removal


def from_official(data: dict[str, Any], overrides=(), source: str = "official config") -> DRDMConfig:
    from medsynth_core.config import merge_dicts, parse_overrides

    mapped = official_to_dict(data, source)
    given = parse_overrides(list(overrides)) if overrides else {}
    _official_data(data, mapped, given, source)
    if given:
        mapped = merge_dicts(mapped, given)
    return config_from_dict(DRDMConfig, mapped, source=source)


def constructor_to_config(ctor: dict[str, Any]) -> ModelConfig:
    """Official ``RecResACNet(n_steps, time_emb_dim, ndims, num_input_chn, res)`` arguments -> ModelConfig."""
    known = {"n_steps", "time_emb_dim", "ndims", "num_input_chn", "res"}
    extra = set(ctor) - known
    if extra:
        raise ConfigError(f"official RecResACNet arguments {sorted(extra)} are unknown")
    return ModelConfig(
        ndims=int(ctor.get("ndims", 2)),
        num_input_chn=int(ctor.get("num_input_chn", 1)),
        time_emb_dim=int(ctor.get("time_emb_dim", 100)),
    )


def build_network(cfg: DRDMConfig, n_steps: int | None = None):
    from .model import RecResACNet

    return RecResACNet(
        n_steps=n_steps or cfg.diffusion.timesteps,
        time_emb_dim=cfg.model.time_emb_dim,
        ndims=cfg.model.ndims,
        num_input_chn=cfg.model.num_input_chn,
    )


def build_diffusion(cfg: DRDMConfig, sampling: bool = False):
    """The forward process; ``sampling=False`` gives the training settings (bilinear, border C-grid; Q6)."""
    from .deform import DeformationDiffusion

    d = cfg.diffusion
    # Q6 (faithful): DRDM_train builds DeformDDPM without ddf_pad_mode/resample_mode -> border/bilinear
    return DeformationDiffusion(
        ndims=cfg.model.ndims,
        img_size=d.img_size,
        ctl_sz=d.ctl_sz,
        v_scale=d.v_scale,
        noise_ratio=d.noise_ratio,
        img_pad_mode=d.img_pad_mode,
        ddf_pad_mode=d.ddf_pad_mode if sampling else "border",
        resample_mode=d.resample_mode if sampling else "bilinear",
        geometric_lift=d.geometric_lift,
        max_img_steps=d.max_img_steps,
    )

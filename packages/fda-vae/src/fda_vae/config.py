"""Typed configuration (loaded with ``medsynth_core.config.load_config``; unknown keys are errors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medsynth_core.config import RunSection, require

KIND = "fda-vae"


@dataclass
class ModelConfig:
    """Generator hyper-parameters (spec §2, train_v3.py:689-704)."""

    spatial_dims: int = 2
    in_channels: int = 1
    out_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    num_res_blocks: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    attention_levels: list[bool] = field(default_factory=list)  # empty: no per-level attention
    with_encoder_nonlocal_attn: bool = True
    with_decoder_nonlocal_attn: bool = True
    use_flash_attention: bool = True  # SDPA (spec §6.2 fix for xformers)

    def __post_init__(self) -> None:
        require(self.spatial_dims == 2, "model.spatial_dims", "must be 2 (FDA-VAE is a slice-wise 2D model)")
        require(len(self.channels) >= 1, "model.channels", "needs at least one level")
        require(
            all(c % self.norm_num_groups == 0 for c in self.channels),
            "model.channels",
            f"must all be divisible by model.norm_num_groups={self.norm_num_groups}",
        )
        require(
            not self.attention_levels or len(self.attention_levels) == len(self.channels),
            "model.attention_levels",
            "must be empty or have one entry per level of model.channels",
        )
        require(self.num_res_blocks >= 1 and self.latent_channels >= 1, "model", "needs positive sizes")

    def kwargs(self) -> dict:
        return dict(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            channels=tuple(self.channels),
            num_res_blocks=self.num_res_blocks,
            latent_channels=self.latent_channels,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            attention_levels=tuple(self.attention_levels) or (False,) * len(self.channels),
            with_encoder_nonlocal_attn=self.with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=self.with_decoder_nonlocal_attn,
            use_flash_attention=self.use_flash_attention,
        )


@dataclass
class DiscriminatorConfig:
    """MONAI PatchDiscriminator (spec §3); one per phase."""

    num_layers_d: int = 3
    channels: int = 32
    norm: str = "INSTANCE"

    def __post_init__(self) -> None:
        require(self.num_layers_d >= 1 and self.channels >= 1, "disc", "needs positive sizes")


@dataclass
class LossConfig:
    """Loss weights of ``train_VAEYnet`` (spec §3, train_v3.py:74-79)."""

    w_trans: float = 1.0
    w_rec: float = 0.01
    w_kl: float = 1e-7
    w_fda: float = 0.01
    w_perc: float = 0.01
    w_adv: float = 0.01
    perceptual: Literal["resnet50-random", "resnet50-pretrained", "none"] = "resnet50-random"
    perceptual_weights: str = ""  # local torchvision ResNet-50 state dict for resnet50-pretrained
    perceptual_seed: int = 0  # spec §6.4: the official random ResNet-50 was unseeded; we seed it
    kl_from_logvar: bool = True  # spec §6.12 fix: KL from the clamped log-variance, not log(σ²)

    def __post_init__(self) -> None:
        for k in ("w_trans", "w_rec", "w_kl", "w_fda", "w_perc", "w_adv"):
            require(getattr(self, k) >= 0, f"loss.{k}", "must be >= 0")
        require(
            self.perceptual != "resnet50-pretrained" or bool(self.perceptual_weights),
            "loss.perceptual_weights",
            "must name a local ResNet-50 weight file for resnet50-pretrained",
        )


@dataclass
class DataConfig:
    """Paired slices ``root/<phase>/<patient>_<slice>.nii.gz`` (spec §4) or the core phantom."""

    source: Literal["folder", "phantom"] = "folder"
    root: str = ""
    phase_a: str = "c_v"  # phase_1 (official 'mr'), the default source
    phase_b: str = "delay"  # phase_2 (official 'ct'), the default target
    image_size: int = 256
    split_file: str = ""  # lesion_patient_list.txt; empty: random patient split (split_seed, val_ratio)
    val_ratio: float = 0.2
    test_ratio: float = 0.0  # > 0: optional held-out test patients (spec §6.7); 0 = official train/val only
    split_seed: int = 42
    sort_pairs: bool = True  # spec §6.5 fix: sorted pair list (identical on every rank)
    phantom_phases: list[str] = field(default_factory=lambda: ["venous", "delay"])
    phantom_train: int = 32
    phantom_val: int = 4
    phantom_size: int = 64
    phantom_seed: int = 0

    def __post_init__(self) -> None:
        require(self.image_size >= 8, "data.image_size", "must be >= 8")
        require(0.0 < self.val_ratio < 1.0, "data.val_ratio", "must be in (0, 1)")
        require(
            0.0 <= self.test_ratio < 1.0 - self.val_ratio, "data.test_ratio", "must be in [0, 1 - val_ratio)"
        )
        require(len(self.phantom_phases) == 2, "data.phantom_phases", "must name two phases")
        if self.source == "phantom":
            from medsynth_core.phantoms import PHASE_NAMES

            require(
                set(self.phantom_phases) <= set(PHASE_NAMES) and len(set(self.phantom_phases)) == 2,
                "data.phantom_phases",
                f"must be two different phases of {list(PHASE_NAMES)}",
            )


@dataclass
class TrainConfig:
    batch_size: int = 6
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)
    epochs: int = 1501
    steps: int = 0  # > 0 overrides epochs
    # extension (not in the official code, whose LambdaLR is 1): "cosine" anneals lr_g and lr_d from their
    # value to 0 over lr_decay_steps (0: the run's total steps); a pure function of the step, so resume is exact
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_decay_steps: int = 0
    skip_spike: bool = True  # spec §3 abnormal-batch skip (train_v3.py:89,120-143)
    skip_spike_factor: float = 2.0
    skip_spike_window: int = 20
    skip_spike_min: int = 5  # the skip is active once MORE than this many values are in the window
    ckpt_every: int = 1000  # steps
    val_every: int = 0  # steps; 0 = once per epoch
    val_sampled: bool = False  # spec §6.3: official validation decodes −μ+σε; default deterministic −μ
    sample_every: int = 1000  # steps between PNG grids
    log_every: int = 50
    num_workers: int = 0

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.lr_g > 0, "train.lr_g", "must be > 0")
        require(self.lr_d > 0, "train.lr_d", "must be > 0")
        require(self.steps >= 0, "train.steps", "must be >= 0 (0: train.epochs decides the run length)")
        require(self.epochs >= 1 or self.steps > 0, "train.epochs", "must be >= 1")
        require(self.lr_decay_steps >= 0, "train.lr_decay_steps", "must be >= 0 (0: the run's total steps)")
        for key in ("ckpt_every", "sample_every", "log_every"):
            require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0: only at the last step)")


@dataclass
class EvalConfig:
    lpips_weights: str = ""  # local torchvision AlexNet state dict (alexnet-owt-7be5be79.pth)
    per_volume: bool = False
    batch_size: int = 8


@dataclass
class RunConfig(RunSection):
    """``run`` (the section every medsynth package shares): <root>/fda-vae/<name>/, seed, device, threads.
    ``deterministic`` (issue 18): every ε keyed by (seed, step, global sample position) so N DDP ranks equal one
    process at the same global batch; false = the official draws from the global generator (seed + rank).
    ``amp``: mixed precision on CUDA, off (official: no AMP) | bf16 | fp16 (with a GradScaler); ignored (off)
    on CPU. YAML reads a bare `off` as false, which means "off" too."""

    name: str = "paper"
    amp: str | bool = "off"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amp is False:
            self.amp = "off"
        require(self.amp in ("off", "bf16", "fp16"), "run.amp", f"must be off, bf16 or fp16, got {self.amp!r}")


@dataclass
class Config:
    # issue 17: one vocabulary across the packages (old spellings are refused with the new name)
    RENAMED = {"name": "run.name", "out_root": "run.root", "device": "run.device", "train.seed": "run.seed",
               "train.threads": "run.threads", "train.keep_last": "run.keep_last",
               "train.deterministic": "run.deterministic", "train.amp": "run.amp", "train.max_steps": "train.steps",
               "data.num_workers": "train.num_workers"}  # fmt: skip
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        down = 2 ** (len(self.model.channels) - 1)
        require(
            self.data.image_size % down == 0,
            "data.image_size",
            f"must be divisible by {down} (2^(levels-1) of model.channels)",
        )

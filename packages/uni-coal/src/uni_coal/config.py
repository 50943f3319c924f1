"""Typed configuration (loaded with ``medsynth_core.config.load_config``); see configs/paper.yaml."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medsynth_core.config import RunSection, require


@dataclass
class GeneratorConfig:
    """UniCOALGenerator (spec §2). Names follow the official constructor where one exists."""

    z_dim: int = 64
    w_dim: int = 512
    c_dim: int = 3
    index_dim: int = 1
    img_resolution: int = 256
    img_channels_in: int = 4
    img_channels_out: int = 1
    mapping_layers: int = 2
    mapping_embed: int | None = None  # None = z_dim (official default)
    mapping_lr_mult: float = 0.01
    channel_base: int = 16384
    channel_max: int = 512
    num_layers: int = 14
    num_critical: int = 2
    first_cutoff: float = 2.0
    first_stopband: float = 2**2.1
    last_stopband_rel: float = 2**0.3
    margin_size: int = 10
    output_scale: float = 0.25
    skip_resolution: int = 128
    conv_kernel: int = 3
    filter_size: int = 6
    lrelu_upsampling: int = 2
    conv_clamp: float | None = 256.0
    magnitude_ema_beta: float = 0.5 ** (16 / 20000)
    cond_mod: bool = True
    enc_modulated: bool = True
    enc_dropout: float = 0.5
    enc_w_dim: int = 512  # Q5: hard-coded 512 in the official code, a parameter here
    enc_embed: int | None = 64
    enc_mapping_layers: int = 2
    global_dim: int = 1024  # Q5: hard-coded 512*2 in the official code
    # Q2: the official run_G passes update_emas=False, so magnitude_ema stays 1 (faithful default False).
    update_magnitude_ema: bool = False

    def __post_init__(self) -> None:
        require(
            self.img_resolution >= 8 and (self.img_resolution & (self.img_resolution - 1)) == 0,
            "img_resolution",
            "must be a power of two >= 8",
        )
        require(self.num_layers > self.num_critical >= 0, "num_layers", "must exceed num_critical")
        require(self.z_dim >= 0 and self.w_dim > 0, "w_dim", "must be > 0")
        require(0.0 <= self.enc_dropout < 1.0, "enc_dropout", "must be in [0, 1)")


@dataclass
class DiscriminatorConfig:
    """CoModDiscriminator (StyleGAN2 resnet D with projection conditioning, spec §4)."""

    c_dim: int = 3
    index_dim: int = 1
    img_resolution: int = 256
    img_channels: int = 5
    channel_base: int = 16384
    channel_max: int = 512
    cmap_dim: int | None = None  # None = channels at 4x4 (official default)
    mapping_layers: int = 2
    mapping_embed: int = 64
    mbstd_group: int = 16
    mbstd_channels: int = 1
    conv_clamp: float | None = None


@dataclass
class SamConfig:
    """Frozen SAM ViT-B image encoder for the feature-matching loss (spec §3)."""

    checkpoint: str | None = "sam_vit_b_01ec64.pth"
    # real-data training refuses to start without the checkpoint unless this is true
    allow_random: bool = False
    # random stand-in ViT (demo/tests, spec §8): used when allow_random and the checkpoint is absent
    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    out_chans: int = 256
    pad_mosaic: bool = False  # Q3: pad a non-square batch to a square mosaic instead of failing


@dataclass
class LossConfig:
    lambda_l1: float = 80.0
    lambda_sam: float = 100.0
    lambda_r1: float = 10.0  # gamma; L_D += lambda_r1 * 0.5 * E||grad||^2
    blur_init_sigma: float = 10.0
    blur_fade_images: int = 200_000


@dataclass
class OptimConfig:
    lr_g: float = 0.0025
    lr_d: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)  # Q1: floats (the official int 0 fails on recent torch)
    eps: float = 1e-8
    # Q1: the official linear decay steps orphaned optimisers, so the real LR is constant (faithful).
    lr_policy: Literal["constant", "linear"] = "constant"
    n_epochs: int = 50
    n_epochs_decay: int = 50
    ema_half_life_images: float = 10_000.0

    def __post_init__(self) -> None:  # issue 18: a negative lr reached torch.optim.Adam as a traceback
        require(self.lr_g > 0, "optim.lr_g", "must be > 0")
        require(self.lr_d > 0, "optim.lr_d", "must be > 0")
        require(all(0.0 <= b < 1.0 for b in self.betas), "optim.betas", "must be in [0, 1)")
        require(self.eps > 0, "optim.eps", "must be > 0")
        require(self.n_epochs >= 0, "optim.n_epochs", "must be >= 0")
        require(self.n_epochs_decay >= 0, "optim.n_epochs_decay", "must be >= 0")
        require(self.ema_half_life_images > 0, "optim.ema_half_life_images", "must be > 0")


@dataclass
class DataConfig:
    kind: Literal["phantom", "h5"] = "h5"
    root: str = "data/ixi_h5"
    train_list: str | None = None  # text file of h5 names (relative to root); None = every *.h5 in root
    test_list: str | None = None
    modalities: tuple[str, ...] = ("T1", "PD", "T2")  # raw_internal_path_out: index = one-hot position
    sources: tuple[str, ...] = ("T1", "T2", "PD")  # drawn uniformly per sample (allrand)
    fixed_source: str | None = None  # set for single-task configs (e.g. BraTS T1->T2)
    fixed_target: str | None = None
    thicknesses: tuple[int, ...] = (4, 6, 2, 1)
    all_hr: bool = True
    slice_num: int = 4
    size: int = 256
    # Q7: the official RandomFlip (IXI, BraTS bases) reseeds on every call, so each subject keeps one fixed flip
    # decision in every epoch: "subject" (faithful default); "random" = the fix (a new draw per item and epoch);
    # "none" = no flip (ADNI bases have no RandomFlip)
    flip: Literal["subject", "random", "none"] = "subject"
    # phantom data (demo)
    phantom_subjects: int = 3
    phantom_shape: tuple[int, int, int] = (24, 32, 32)

    def __post_init__(self) -> None:
        require(self.slice_num == 4, "slice_num", "must be 4 (the encoder's stack of spec §1)")
        require(len(self.thicknesses) > 0 and min(self.thicknesses) >= 1, "thicknesses", "must be >= 1")


@dataclass
class TrainConfig:
    batch_size: int = 16
    epochs: int = 100
    steps: int | None = None  # overrides epochs when set
    ckpt_every: int = 5000
    sample_every: int = 5000
    log_every: int = 100
    num_workers: int = 4
    drop_last: bool = True  # Q3: the official loader keeps a partial last batch (breaks the SAM mosaic)
    nan_to_num: bool = True

    def __post_init__(self) -> None:
        for key in ("ckpt_every", "sample_every", "log_every"):
            require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0: only at the last step)")
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.epochs >= 1, "train.epochs", "must be >= 1")
        require(self.steps is None or self.steps >= 1, "train.steps", "must be >= 1 (or null: epochs)")
        require(self.num_workers >= 0, "train.num_workers", "must be >= 0")


@dataclass
class RunConfig(RunSection):
    """``run`` (the section every medsynth package shares): <root>/uni-coal/<name>/, seed, device, threads
    (0: torch's default), checkpoints kept. ``deterministic`` (issue 18): z and the encoder's dropout masks
    keyed by (seed, step, global sample position), so N DDP ranks equal one process at the same global batch
    (the minibatch-std group must fit in a rank's batch); false = the official draws from the global
    generator (seed + rank per rank)."""

    name: str = "paper"


@dataclass
class Config:
    # issue 17: one vocabulary across the packages (old spellings are refused with the new name)
    RENAMED = {"name": "run.name", "seed": "run.seed", "run_root": "run.root", "train.device": "run.device",
               "train.threads": "run.threads", "train.keep_last": "run.keep_last",
               "train.deterministic": "run.deterministic", "train.max_steps": "train.steps"}  # fmt: skip
    run: RunConfig = field(default_factory=RunConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    sam: SamConfig = field(default_factory=SamConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        n = len(self.data.modalities)
        require(self.generator.c_dim == n, "generator.c_dim", f"must equal len(data.modalities) = {n}")
        require(
            self.discriminator.c_dim == n, "discriminator.c_dim", f"must equal len(data.modalities) = {n}"
        )
        require(
            self.generator.index_dim == self.discriminator.index_dim,
            "discriminator.index_dim",
            "must equal generator.index_dim",
        )
        require(
            self.discriminator.img_channels
            == self.generator.img_channels_in + self.generator.img_channels_out,
            "discriminator.img_channels",
            "must be generator.img_channels_in + img_channels_out (cat(A, B))",
        )
        require(
            self.generator.img_resolution == self.data.size == self.discriminator.img_resolution,
            "data.size",
            "must equal generator.img_resolution and discriminator.img_resolution",
        )

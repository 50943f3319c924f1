"""Typed configuration (loaded with ``medsynth_core.config.load_config``; unknown keys are errors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medsynth_core.config import RunSection, require

from .model import ModelConfig


@dataclass
class DiffusionConfig:
    T: int = 1000  # spec §1.2
    beta_start: float = 1e-4
    beta_end: float = 0.02
    eval_steps: int = 20  # T_eval for in-training previews (ddim20)

    def __post_init__(self) -> None:
        require(self.T >= 2, "diffusion.T", "must be >= 2")


@dataclass
class DataConfig:
    source: Literal["phantom", "nifti"] = "phantom"
    root: str = ""  # folder of 4D SAX cine NIfTIs (T x Z x H x W in SimpleITK order) when source = nifti
    pattern: str = "*.nii.gz"
    max_files: int = 30000  # fork caps the file list at 30,000 (spec §2)
    percentile: float = 98.0  # clip to [0, p98 of the whole 4D array] → [-1, 1] (spec §2)
    include_zeros_in_percentile: bool = True  # fork: p98 over the whole array including background
    drop_empty_slices: bool = False  # fork trains on all-zero slices too (spec §5 fix: option)
    n4: bool = False  # N4 bias-field correction (SimpleITK) before normalising
    val_fraction: float = 0.1  # subject-level split (fork: val = train, spec §5)
    # phantom source (spec §8)
    phantom_subjects: int = 4
    phantom_frames: int = 4
    phantom_slices: int = 8
    phantom_pixel_spacing: float = 1.5  # mm; the anatomy is scaled to fit the field of view and the stack
    phantom_slice_spacing: float = 8.0  # mm (medsynth_core.phantoms.cardiac_cine)
    phantom_slice_offset: float = 0.0  # mm along the long axis; < 0 adds slices above the base
    phantom_supersample: int = 1  # in-plane sub-samples per pixel axis (partial volume); 1: point samples

    def __post_init__(self) -> None:
        require(0 < self.percentile <= 100, "data.percentile", "must be in (0, 100]")
        require(self.phantom_pixel_spacing > 0, "data.phantom_pixel_spacing", "must be > 0 (mm)")
        require(self.phantom_slice_spacing > 0, "data.phantom_slice_spacing", "must be > 0 (mm)")
        require(self.phantom_supersample >= 1, "data.phantom_supersample", "must be >= 1")
        require(0 <= self.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")


@dataclass
class TrainConfig:
    batch_size: int = 25  # per GPU; 4 x 25 = 100 global (spec §1.3)
    lr: float = 1e-4  # Adam, weight decay 0, no warm-up
    # extension (the fork keeps lr constant): "cosine" decays lr to 0 at train.steps after a linear warm-up
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr (0: none, as the fork)
    ema_decay: float = 0.9999  # every step, all weights and buffers
    grad_clip: float = 1.0  # global norm
    steps: int = 756789  # released ckpt step (fork's total_samples is ignored, spec §1.3)
    ckpt_every: int = 10000
    sample_every: int = 10000  # PNG previews (reconstructions + random samples, ddim20)
    log_every: int = 100
    # validation on the subject-level split (data.val_fraction; the fork used val = train): reconstruction
    # PSNR of val_samples validation slices with inferred x_T (EMA weights, ddim val_steps; 0 = eval_steps),
    # every val_every steps (0: at the last step only); the best is kept as checkpoints/best.pt
    val_every: int = 10000
    val_samples: int = 64
    val_steps: int = 0
    fp16: bool = False  # fork's "16-mixed" runs the maths in fp32 (autocast off in training_step)
    num_workers: int = 0

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(0 <= self.ema_decay <= 1, "train.ema_decay", "must be in [0, 1]")
        require(self.steps >= 1, "train.steps", "must be >= 1")
        require(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        require(self.val_samples >= 1, "train.val_samples", "must be >= 1")
        require(self.val_steps >= 0, "train.val_steps", "must be >= 0 (0: diffusion.eval_steps)")
        for key in ("ckpt_every", "sample_every", "log_every", "val_every"):
            require(getattr(self, key) >= 0, f"train.{key}", "must be >= 0 (0: only at the last step)")


@dataclass
class InverseConfig:
    """Inverse optimisation (spec §3); fork bugs are fixed by default behind the named flags."""

    K: int = 8  # dense slices per SAX gap (D = K(n-1)+1)
    encode_steps: int = 30  # DDIM steps for stochastic encoding (ddim30)
    decode_steps: int = 30  # DDIM steps for the differentiable decoder
    iterations: int = 200
    lr: float = 2e-3
    lr_step: int = 50  # StepLR step, stepped every iteration
    lr_gamma: float = 0.5
    lambda_lax: float = 5.0
    lambda_lat: float = 0.02
    lambda_smooth: float = 5.0
    lambda_sax: float = 0.0  # optional SAX-fidelity term (not in the fork; spec §9 q4)
    pullback: float = 1e-3  # v ← (1−α)v + α v0 after each step
    early_stop_tol: float = 1e-5
    early_stop_patience: int = 5
    checkpoint: bool = False  # gradient checkpointing of each UNet call in the decoder
    interp_positions: Literal["grid", "fork"] = "grid"  # fork: 0, 0, 1/7..6/7 (bug, spec §3.2)
    lax_space: Literal["volume", "plane"] = "volume"  # fork: volume-space targets on the dense grid
    half_thickness: float | None = None  # mm; default dense z-spacing / 2 (spec §9 q1)
    mask_target: bool = True  # fix: mask both sides (fork leaves G unmasked)
    mask_eps: float = 1e-8  # fix: ε-guard for empty masks (0 reproduces the fork's NaN)
    harmonise: bool = True  # moment-match LAX targets to the linear SAX volume inside the ROI (fork)
    geometry_from_kept_slices: bool = True  # fix: spacing/origin from kept slices (fork uses Z_orig)
    flip_h: bool = True  # flip the H axis to the UKB orientation (fork) and back on output
    freeze_ends: bool = False  # ex10 freezes the two end slices
    freeze_acquired: bool = False  # extension: keep every acquired slice at its encoding (ex8 optimises them)
    # inference preprocessing of the files given to `mgdcr reconstruct` / `encode` (spec §2-§3, ex8 L161-254)
    n4: bool = True  # N4 bias-field correction of the SAX cine and the LAX images (ex8 always; `--no-n4`)
    # LAX harmonisation reference S: "official" = the linear-in-z volume of the SAX frame without N4, clipped
    # at its 99th percentile to [0, 1] (ex8 L236-240); "model" = the linear volume of the SAX slices as the
    # model sees them (N4 when inverse.n4, p98 of the 4D array), the same scale as the reconstruction
    harmonise_reference: Literal["official", "model"] = "official"
    # which SAX slices are dropped before encoding: "official" = where ex8/ex10 drop them (the max of the
    # [-1, 1] slice is exactly 0, so an all-zero slice, at -1, is kept); "zero" = all-zero slices; "none"
    drop_empty: Literal["official", "zero", "none"] = "official"
    # mixed precision of the differentiable decode + losses (ex8: fp16 autocast + GradScaler on CUDA); on
    # CPU every mode runs in full precision, so CPU results never change
    amp: Literal["off", "fp16", "bf16"] = "fp16"

    def __post_init__(self) -> None:
        require(self.K >= 1, "inverse.K", "must be >= 1")
        require(self.iterations >= 0, "inverse.iterations", "must be >= 0")


@dataclass
class LatentConfig:
    """Optional latent DDIM on z_sem (spec §1.4, ``ffhq128_autoenc_latent``); off by default. With
    ``enabled`` the ``train`` verb trains it on the z_sem of the frozen EMA prior in ``prior``."""

    enabled: bool = False
    prior: str = ""  # mgdcr checkpoint of the trained image prior
    num_layers: int = 10
    hidden: int = 2048
    time_channels: int = 64
    condition_bias: float = 1.0
    dropout: float = 0.0
    beta: float = 0.008  # constant β, T = 1000
    loss: Literal["l1", "l2"] = "l1"
    znormalize: bool = True  # z-normalise z_sem with dataset statistics
    eval_steps: int = 20
    batch_size: int = 256
    lr: float = 1e-4  # AdamW
    weight_decay: float = 0.01
    steps: int = 394531  # 101 M samples at batch 256
    ema_decay: float = 0.9999
    ckpt_every: int = 10000

    def __post_init__(self) -> None:
        require(self.num_layers >= 2, "latent.num_layers", "must be >= 2")
        require(self.beta > 0, "latent.beta", "must be > 0")
        require(self.ckpt_every >= 0, "latent.ckpt_every", "must be >= 0 (0: only at the last step)")


@dataclass
class DemoConfig:
    """Held-out evaluation of ``mgdcr demo`` (``../shared/LEARNING.md``): phantom subjects whose seeds the
    training never used (training uses seeds 1..data.phantom_subjects). The sparse stack has ``n_slices``
    slices ``slice_spacing`` mm apart (pixel spacing: ``data.phantom_pixel_spacing``); the dense grid adds
    ``inverse.K − 1`` slices per gap, and the score is taken on those (the non-acquired dense slices)."""

    heldout_seeds: list[int] = field(default_factory=lambda: [200, 201, 202])
    n_slices: int = 5
    slice_spacing: float = 8.0
    slice_offset: float = 0.0  # mm along the long axis (cardiac_cine); < 0 moves the base between slices
    # phantom family (added to slice_offset): "apex" (the stack starts 4 mm below the base plane, the apex lies
    # in the last gap), "base" (the stack 6 mm higher: the first slice is above the heart, the base plane lies
    # 2 mm into the first gap, a through-plane edge that only the LAX planes show)
    family: Literal["apex", "base"] = "apex"
    n_frames: int = 2
    frame: int = 0

    def __post_init__(self) -> None:
        require(len(self.heldout_seeds) >= 1, "demo.heldout_seeds", "needs at least one phantom seed")
        require(self.n_slices >= 2, "demo.n_slices", "must be >= 2")
        require(self.slice_spacing > 0, "demo.slice_spacing", "must be > 0 (mm)")
        require(0 <= self.frame < self.n_frames, "demo.frame", "must be in [0, demo.n_frames)")


@dataclass
class RunConfig(RunSection):
    """``run`` (the section every medsynth package shares): <root>/mgdcr/<name>/ (the latent DDIM in
    <name>-latent), seed, device, threads, checkpoints kept. ``deterministic`` (issue 18, not in the fork):
    each sample's level t and noise from a generator keyed by (seed, step, its position in the global
    batch), so N ranks and one process at the same global batch agree."""

    name: str = "paper"


@dataclass
class Config:
    # issue 17: one vocabulary across the packages (old spellings are refused with the new name)
    RENAMED = {"name": "run.name", "seed": "run.seed", "device": "run.device", "run_root": "run.root",
               "train.keep_last": "run.keep_last", "train.deterministic": "run.deterministic"}  # fmt: skip
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inverse: InverseConfig = field(default_factory=InverseConfig)
    latent: LatentConfig = field(default_factory=LatentConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)

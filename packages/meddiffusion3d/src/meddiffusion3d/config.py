"""Typed config of the package (YAML via ``medsynth_core.config``; unknown keys are errors).

Sections: ``data``, ``ae`` (patch-volume autoencoder, both stages), ``run`` (run folder, seed, device),
``infer`` (chunked encode / tiled decode). ``biflownet``, ``diffusion``, ``train`` and ``controlnet`` are
the extension points of part 2 (issue #8): free-form mappings here, to be replaced by typed sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medsynth_core.config import require


@dataclass
class StageConfig:
    steps: int = 1_000_000  # optimiser steps (Lightning global_step; spec §1.3 max_steps 1e6)
    batch: int = 24  # patches per step (stage 1) / volumes (stage 2: 1)
    lr: float = 3e-4  # Adam lr for AE and discriminator
    betas: tuple[float, float] = (0.5, 0.9)
    disc_start: int = 20_000  # s_D: GAN + feature matching switch on after this step
    ckpt_every: int = 3000
    log_every: int = 50
    image_every: int = 1000
    amp: bool = False  # bf16 autocast on CUDA (paper 4×); no-op on CPU

    def __post_init__(self) -> None:
        require(self.steps > 0, "steps", "must be > 0")
        require(self.batch > 0, "batch", "must be > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.disc_start >= 0, "disc_start", "must be >= 0")
        require(self.ckpt_every > 0, "ckpt_every", "must be > 0")


@dataclass
class AEConfig:
    n_hiddens: int = 48  # width of the first encoder level
    downsample: int = 8  # 4 or 8 (official [d, d, d]; isotropic only)
    norm_type: Literal["group", "batch"] = "group"
    num_groups: int = 24  # GroupNorm groups
    embedding_dim: int = 8  # latent channels = code dimension
    n_codes: int = 8192
    attn_heads: int = 4  # bottleneck attention, 4 heads × 32
    attn_dim_head: int = 32
    image_channels: int = 1
    ema_decay: float = 0.99
    ema_eps: float = 1e-7
    commit: float = 0.25  # commitment weight (β·MSE(z, sg e))
    restart_thres: float = 1.0  # dead-code restart when N < this
    random_restart: bool = True  # official no_random_restart: False
    disc_channels: int = 32  # PatchGAN ndf
    disc_layers: int = 3
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    l1_w: float = 4.0
    tp_w: float = 2.0  # tri-plane LPIPS weight
    gan_w: float = 2.0  # volume_gan_weight (G term and D loss)
    fm_w: float = 4.0  # feature-matching weight
    tp_ratio: float = 0.2  # fraction of slices per plane for L_TP
    perceptual: Literal["lpips_vgg", "random_tiny_2d", "none"] = "lpips_vgg"
    perceptual_weights: str | None = None  # local torchvision vgg16 state dict; None → random backbone
    # official-code bug fixes (spec §6), each a flag whose default is the fix
    codebook_init_buffer: bool = True  # §6.1: init flag is a saved buffer (no re-init after reload)
    stage2_freeze: bool = True  # §6.1: stage-2 frozen modules pinned to eval, codebook never updates
    perceptual_eval: bool = True  # §6.2: LPIPS dropout off (official: live in training)
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = field(default_factory=lambda: StageConfig(batch=1, lr=3e-5, disc_start=0))

    def __post_init__(self) -> None:
        require(
            self.downsample >= 2 and self.downsample & (self.downsample - 1) == 0,
            "downsample",
            "must be a power of two >= 2 (4 or 8 in the paper)",
        )
        require(
            self.n_hiddens % self.num_groups == 0 or self.norm_type != "group",
            "n_hiddens",
            f"must be divisible by num_groups={self.num_groups}",
        )
        require(self.n_codes > 0 and self.embedding_dim > 0, "n_codes", "and embedding_dim must be > 0")
        require(0 < self.tp_ratio <= 1, "tp_ratio", "must be in (0, 1]")
        require(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)")


@dataclass
class DataConfig:
    root: str | None = None  # folder of NIfTI/NRRD/MHA files or DICOM series folders
    synthetic: bool = False  # medsynth_core.phantoms.classed_volumes instead of files
    volume: tuple[int, int, int] = (32, 32, 32)  # synthetic volume shape (D, H, W)
    n_volumes: int = 4  # synthetic volumes
    n_classes: int = 2
    patch: int = 64  # stage-1 crop / stage-2 patch size P
    intensity: Literal["unit", "ct", "mr", "none"] = "unit"  # unit: files in [0,1] → 2x−1 (official)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)  # HU range → [-1, 1] (not in the official code)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # MR clip → [-1, 1] (not in the official code)
    spacing: tuple[float, float, float] | None = None  # resample to this spacing (mm), None: keep
    stage2_max_voxels: int = 256 * 256 * 128  # larger volumes are cropped for stage 2
    stage2_crop: tuple[int, int, int] = (192, 192, 192)  # 8×: 192³; 4×: 256×256×128
    val_files: int = 40  # last files after a seed-216 shuffle are held out
    split_seed: int = 216
    flip_p: float = 0.5  # in-plane flip, then in-plane rot90 (stage 1)
    rot_p: float = 0.5
    num_workers: int = 0

    def __post_init__(self) -> None:
        require(self.patch > 0, "patch", "must be > 0")


@dataclass
class InferConfig:
    chunk: int = 8  # patches encoded per forward (memory bound)
    decode_tile: int = 0  # latent tile edge for tiled decoding (0: whole latent at once)
    decode_overlap: float = 0.0  # >0: overlapped Gaussian-blended tiles (spec §6.5 fix)


@dataclass
class RunConfig:
    name: str = "patchvolume"
    root: str = "runs"  # runs/<package>/<name>/
    seed: int = 1234
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch default)
    keep_last: int = 3


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    run: RunConfig = field(default_factory=RunConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    # part 2 (issue #8) extension points, not used by the autoencoder
    biflownet: dict[str, Any] = field(default_factory=dict)
    diffusion: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    controlnet: dict[str, Any] = field(default_factory=dict)


def build_autoencoder(ae: AEConfig):
    from .autoencoder import PatchVolumeAE

    return PatchVolumeAE(
        n_hiddens=ae.n_hiddens,
        downsample=ae.downsample,
        image_channels=ae.image_channels,
        norm_type=ae.norm_type,
        num_groups=ae.num_groups,
        embedding_dim=ae.embedding_dim,
        n_codes=ae.n_codes,
        attn_heads=ae.attn_heads,
        attn_dim_head=ae.attn_dim_head,
        commitment=ae.commit,
        ema_decay=ae.ema_decay,
        ema_eps=ae.ema_eps,
        restart_thres=ae.restart_thres,
        random_restart=ae.random_restart,
        codebook_init_buffer=ae.codebook_init_buffer,
        stage2_freeze=ae.stage2_freeze,
    )


def build_discriminator(ae: AEConfig):
    from .discriminator import NLayerDiscriminator3D

    return NLayerDiscriminator3D(ae.image_channels, ae.disc_channels, ae.disc_layers)

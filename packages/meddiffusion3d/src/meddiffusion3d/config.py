"""Typed config of the package (YAML via ``medsynth_core.config``; unknown keys are errors).

Sections: ``data``, ``ae`` (patch-volume autoencoder, both stages), ``run`` (run folder, seed, device),
``infer`` (chunked encode / tiled decode), ``biflownet`` (denoiser, spec §2), ``diffusion`` (spec §3),
``train`` (BiFlowNet on cached latents) and ``controlnet`` (spec §4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medsynth_core.config import RunSection, require


def _amp(value, when_true: str, key: str) -> str:
    from .precision import amp_mode

    try:
        return amp_mode(value, when_true)
    except ValueError as exc:
        require(False, key, str(exc))
        raise


@dataclass
class StageConfig:
    steps: int = 1_000_000  # optimiser steps (Lightning global_step; spec §1.3 max_steps 1e6)
    batch_size: int = 24  # patches per step and process (stage 1) / volumes (stage 2: 1)
    lr: float = 3e-4  # Adam lr for AE and discriminator
    betas: tuple[float, float] = (0.5, 0.9)
    disc_start: int = 20_000  # s_D: GAN + feature matching switch on after this step
    ckpt_every: int = 3000
    log_every: int = 50
    sample_every: int = 1000  # PNG previews
    # off | bf16 | fp16 (fp16 with GradScalers); official: bf16-mixed for 4×, fp32 for 8×; fp32 on CPU always
    amp: Literal["off", "bf16", "fp16"] | bool = "off"

    def __post_init__(self) -> None:
        self.amp = _amp(self.amp, "bf16", "amp")
        require(self.steps > 0, "steps", "must be > 0")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.disc_start >= 0, "disc_start", "must be >= 0")
        require(self.ckpt_every > 0, "ckpt_every", "must be > 0")
        require(self.log_every >= 0 and self.sample_every >= 0, "log_every", "and sample_every must be >= 0")


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
    stage2: StageConfig = field(default_factory=lambda: StageConfig(batch_size=1, lr=3e-5, disc_start=0))

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
    phantom_seed: int = 0  # synthetic: classed_volumes(seed=...); held-out phantoms use another seed
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
    # true: each file is read, resampled and intensity-mapped once and kept in memory; stage-1 crops come
    # from that copy. false (official torchio dataset): the file is re-read and resampled for every crop.
    # Off by default because a whole real dataset rarely fits in memory; the phantom recipe turns it on.
    cache_volumes: bool = False

    def __post_init__(self) -> None:
        require(self.patch > 0, "patch", "must be > 0")


@dataclass
class InferConfig:
    chunk: int = 8  # patches encoded per forward (memory bound)
    decode_tile: int = 0  # latent tile edge for tiled decoding (0: whole latent at once)
    decode_overlap: float = 0.0  # >0: overlapped Gaussian-blended tiles (spec §6.5 fix)


@dataclass
class RunConfig(RunSection):
    """``run`` (the section every medsynth package shares): runs/<package>/<name>/ under ``root``, seed, device,
    CPU threads (0: torch's default), checkpoints kept. ``deterministic`` (issue 18): BiFlowNet and ControlNet
    training draw each sample's t, ε and class drop from a generator keyed by (seed, step, global sample
    position), and the AE stages their codebook restart codes and tri-plane slices from the global batch with
    a (seed, step) generator, so N DDP ranks equal one process at the same global batch (AE: until BatchNorm,
    the discriminator's, starts); false = per-rank draws."""

    name: str = "patchvolume"
    seed: int = 1234


@dataclass
class BiFlowNetConfig:
    """``BiFlowNet(**asdict(cfg))`` (spec §2); defaults are the paper's 8× model (157,654,880 parameters)."""

    channels: int = 8  # latent channels (= ae.embedding_dim)
    dim: int = 72
    dim_mults: tuple[int, ...] = (1, 1, 2, 4, 8)
    use_attn: tuple[int, ...] = (0, 0, 0, 1, 1)
    attn_heads: int = 8
    attn_dim_head: int = 32
    resnet_groups: int = 24
    classes: int = 7  # 0 CTHeadNeck … 6 MRKnee (biflownet.CLASS_NAMES)
    res_condition: bool = True
    sub_volume: int = 8  # latent sub-volume edge of one DiT sequence
    dit_patch: int = 1  # 1 for 8×, 2 for 4×
    dit_heads: int = 8
    mlp_ratio: float = 4.0
    num_mid_dit: int = 1
    learn_sigma: bool = False
    init_kernel_size: int = 3
    null_class: bool = False  # extra "no class" row for classifier-free guidance (off: official)

    def __post_init__(self) -> None:
        require(len(self.dim_mults) == len(self.use_attn), "use_attn", "needs one entry per dim_mults level")
        require(self.classes > 0, "classes", "must be > 0")
        require(self.sub_volume % self.dit_patch == 0, "sub_volume", "must be a multiple of dit_patch")


@dataclass
class DiffusionConfig:
    T: int = 1000  # diffusion steps
    schedule: Literal["cosine"] = "cosine"
    loss: Literal["l1", "l2"] = "l1"  # l1: official/released weights; l2: the paper's formula
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # paper samples: ancestral DDPM over all T steps
    sample_steps: int = 100  # DDIM steps
    eta: float = 0.0  # DDIM eta
    clip_denoised: bool = True  # clamp x̂₀ to [-1, 1]
    # DDIM direction term: false = the network's ε (official p_sample_ddim); true = ε recomputed from the
    # clipped x̂₀, so that x̂₀ and ε agree when clipping bites
    ddim_recompute_eps: bool = False
    guidance_scale: float = 1.0  # classifier-free guidance (needs biflownet.null_class; 1 = off)
    cond_drop_prob: float = 0.0  # class dropout during training (needs biflownet.null_class)
    ema: float = 0.995  # model EMA decay
    ema_every: int = 10  # EMA applied every N steps
    ema_start: int = 2000  # plain copy before this step

    def __post_init__(self) -> None:
        require(self.T > 1, "T", "must be > 1")
        require(self.sample_steps > 0, "sample_steps", "must be > 0")
        require(0 <= self.cond_drop_prob < 1, "cond_drop_prob", "must be in [0, 1)")
        require(0 < self.ema < 1, "ema", "must be in (0, 1)")
        require(self.ema_every > 0, "ema_every", "must be > 0")


def bucket_shape(key: str) -> tuple[int, int, int] | None:
    """``"8x40x40"`` → (8, 40, 40); None when the key is not three positive integers."""
    parts = str(key).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        return None
    return tuple(int(p) for p in parts)


@dataclass
class TrainConfig:
    latents: str | None = None  # folder of *.latent.pt written by `meddiffusion3d encode`
    manifest: str | None = None  # CSV (name,class) or JSON {name: class}; classes as index or name
    autoencoder: str | None = None  # AE checkpoint that wrote the latents (used by generate)
    steps: int = 1_000_000
    batch_size: int = 16  # latents per process
    lr: float = 1e-4  # Adam, default betas, constant
    # off | bf16 | fp16; official: fp16 autocast + GradScaler (train_BiFlowNet_SingleRes.py); fp32 on CPU always
    amp: Literal["off", "bf16", "fp16"] | bool = "fp16"
    ckpt_every: int = 500
    log_every: int = 100
    sample_every: int = 1000  # PNG previews of a one-step denoise (0: at the last step only)
    num_workers: int = 0
    # multi-resolution ("universal", spec §2) training: latents of several shapes train together, each batch
    # from one shape; "DxHxW" (latent shape) -> latents per process for that bucket, others use `batch_size`
    bucket_batch: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.amp = _amp(self.amp, "fp16", "amp")
        for key, b in self.bucket_batch.items():
            require(bucket_shape(key) is not None, f"bucket_batch.{key}", "must be a latent shape like 8x40x40")
            require(int(b) > 0, f"bucket_batch.{key}", "must be > 0")
        require(self.steps > 0, "steps", "must be > 0")
        require(self.batch_size > 0, "batch_size", "must be > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.ckpt_every > 0, "ckpt_every", "must be > 0")
        require(self.log_every > 0, "log_every", "must be > 0")
        require(self.sample_every >= 0, "sample_every", "must be >= 0 (0: at the last step only)")


@dataclass
class ControlNetConfig:
    variant: Literal["v1", "v2"] = "v1"  # v1: encoded hint (cldm); v2: image hint, no DiT clone
    hint_channels: int = 8  # v1: latent channels; v2: image channels (1)
    task: Literal["thick_slice", "sparse_view_ct", "limited_angle_ct", "kspace"] = "sparse_view_ct"
    task_params: dict[str, float] = field(default_factory=dict)  # degrade.degrade keyword arguments
    class_label: int = 0  # y for every fine-tuning sample (official: 0)
    base: str | None = None  # BiFlowNet checkpoint (its EMA weights are the frozen base)
    steps: int = 10_000
    batch_size: int = 1
    lr: float = 1e-4  # Adam (not given by the authors)
    control_scales: tuple[float, ...] = (1.0,)  # one value for all, or one per level + mid
    ckpt_every: int = 500
    log_every: int = 50
    sample_every: int = 500  # PNG previews of a one-step denoise with the hint (0: at the last step only)
    # true (official: the authors fine-tune on folders of pre-computed condition/GT latents): every training
    # volume and its degraded hint are encoded once by the frozen AE before the loop. false: encode the
    # clean volume and simulate + encode the hint at every step (slower; random stage-2 crops every epoch)
    cache_latents: bool = True

    def __post_init__(self) -> None:
        require(self.hint_channels > 0, "hint_channels", "must be > 0")
        require(self.steps > 0 and self.batch_size > 0, "steps", "and batch_size must be > 0")
        require(self.lr > 0, "lr", "must be > 0")
        require(self.ckpt_every > 0 and self.log_every >= 0, "ckpt_every", "must be > 0 (log_every >= 0)")
        require(self.sample_every >= 0, "sample_every", "must be >= 0 (0: at the last step only)")


@dataclass
class Config:
    # issue 17: one vocabulary across the packages (old spellings are refused with the new name)
    RENAMED = {"ae.stage1.batch": "ae.stage1.batch_size", "ae.stage2.batch": "ae.stage2.batch_size",
               "ae.stage1.image_every": "ae.stage1.sample_every", "ae.stage2.image_every": "ae.stage2.sample_every",
               "train.batch": "train.batch_size", "train.threads": "run.threads",
               "controlnet.batch": "controlnet.batch_size"}  # fmt: skip
    data: DataConfig = field(default_factory=DataConfig)
    ae: AEConfig = field(default_factory=AEConfig)
    run: RunConfig = field(default_factory=RunConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    biflownet: BiFlowNetConfig = field(default_factory=BiFlowNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    controlnet: ControlNetConfig = field(default_factory=ControlNetConfig)


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


def build_biflownet(cfg: BiFlowNetConfig):
    from dataclasses import asdict

    from .biflownet import BiFlowNet

    return BiFlowNet(**asdict(cfg))


def build_diffusion(cfg: Config):
    from .diffusion import GaussianDiffusion

    d = cfg.diffusion
    return GaussianDiffusion(
        timesteps=d.T,
        loss=d.loss,
        schedule=d.schedule,
        clip_denoised=d.clip_denoised,
        cond_drop_prob=d.cond_drop_prob,
        null_class=cfg.biflownet.classes if cfg.biflownet.null_class else None,
        ddim_recompute_eps=d.ddim_recompute_eps,
    )

"""Frozen SAM image encoder and the SAM feature-matching loss (spec §3)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn

from medsynth_core.cli import UserError

from .config import SamConfig

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def _vit(cfg: SamConfig) -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT

    return ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
        window_size=cfg.window_size,
        out_chans=cfg.out_chans,
    )


def mosaic(x: torch.Tensor, pad: bool = False, fill: float = 0.0) -> torch.Tensor:
    """[k*k, C, H, W] -> [1, C, k*H, k*W]; sample j*k+i lands in row j, column i (``split_bs_to_hw``).

    The official code needs a square batch (Q3); with ``pad`` a batch is padded with ``fill`` images.
    """
    n, c, h, w = x.shape
    k = math.isqrt(n)
    if k * k != n:
        if not pad:
            raise ValueError(
                f"the SAM mosaic needs a square batch (4, 9, 16, ...), got {n}; "
                "use train.drop_last=true or sam.pad_mosaic=true"
            )
        k = k + 1
        x = torch.cat([x, x.new_full((k * k - n, c, h, w), fill)], 0)
    return x.reshape(k, k, c, h, w).permute(2, 0, 3, 1, 4).reshape(1, c, k * h, k * w)


class SamGuidance(nn.Module):
    """L_SAM = mean |E(pre(fake)) - E(pre(real))| on the batch mosaic; the encoder is frozen (spec §3)."""

    def __init__(self, cfg: SamConfig, encoder: nn.Module, is_pretrained: bool):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.is_pretrained = is_pretrained
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SamGuidance:  # stays in eval mode
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1,1] 1-channel batch -> 3-channel [0,255] mosaic -> SAM normalisation -> pad to img_size."""
        x = (x.expand(-1, 3, -1, -1) + 1) / 2 * 255
        x = mosaic(x, pad=self.cfg.pad_mosaic, fill=0.0)
        x = (x - self.pixel_mean) / self.pixel_std
        size = self.cfg.img_size
        if x.shape[-1] > size or x.shape[-2] > size:
            raise ValueError(f"SAM mosaic {tuple(x.shape[-2:])} exceeds the encoder's img_size {size}")
        return nn.functional.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.preprocess(x))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = self.embed(real)
        return (self.embed(fake) - target).abs().mean()


def build_sam(cfg: SamConfig, seed: int = 1234) -> SamGuidance:
    """Load ``cfg.checkpoint`` (a full SAM or an image-encoder state dict). Without it: a random stand-in
    (only when ``cfg.allow_random``), else a :class:`UserError` telling how to proceed."""
    path = Path(cfg.checkpoint) if cfg.checkpoint else None
    if path is not None and path.is_file():
        enc = _vit(cfg)  # the paper config's geometry is ViT-B (sam_vit_b_01ec64.pth)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"{path}: cannot read the SAM checkpoint ({exc})") from exc
        if any(k.startswith("image_encoder.") for k in state):
            state = {
                k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")
            }
        try:
            missing, _ = enc.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatch: another ViT size
            raise UserError(
                f"{path}: SAM weights do not fit the configured encoder ({str(exc)[:200]})"
            ) from exc
        if missing:
            raise UserError(
                f"{path}: not a SAM ViT-B checkpoint (missing {len(missing)} image-encoder keys, "
                f"e.g. {missing[:3]}); download sam_vit_b_01ec64.pth"
            )
        return SamGuidance(cfg, enc, True)
    if not cfg.allow_random:
        raise UserError(
            f"SAM weights not found at '{cfg.checkpoint}'. Download sam_vit_b_01ec64.pth and set "
            "sam.checkpoint=PATH, or set loss.lambda_sam=0 to train without SAM guidance "
            "(sam.allow_random=true only for demos/tests: a random ViT is not the paper's loss)."
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = _vit(cfg)
    return SamGuidance(cfg, enc, False)

"""Patch-volume VQ autoencoder (spec §1.1, official ``AutoEncoder/model/PatchVolume.py``).

Module and parameter names follow the official ones, so official checkpoints map key for key
(``convert.py``). Convolutions use PyTorch's default init; there is no output activation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .encode import patch_encode as _patch_encode
from .quantizer import Codebook


def normalize(channels: int, norm_type: str = "group", num_groups: int = 24) -> nn.Module:
    """GN (eps 1e-6, affine) or, with ``batch``, SyncBatchNorm as in the official configs."""
    if norm_type == "group":
        return nn.GroupNorm(num_groups=num_groups, num_channels=channels, eps=1e-6, affine=True)
    if norm_type == "batch":
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"norm_type must be 'group' or 'batch', got {norm_type!r}")


class ResBlockX(nn.Module):
    """GN → SiLU → Conv3³ → GN → SiLU → Conv3³ with an identity skip (in == out)."""

    def __init__(self, channels: int, norm_type: str = "group", num_groups: int = 24):
        super().__init__()
        # official sizes norm2 with in_channels (spec §6.3); identical here because in == out
        self.norm1 = normalize(channels, norm_type, num_groups)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.norm2 = normalize(channels, norm_type, num_groups)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class ResBlockXY(nn.Module):
    """As :class:`ResBlockX` with in ≠ out and a 1×1×1 conv skip (``resConv``)."""

    def __init__(self, in_channels: int, out_channels: int, norm_type: str = "group", num_groups: int = 24):
        super().__init__()
        self.resConv = nn.Conv3d(in_channels, out_channels, 1)
        self.norm1 = normalize(in_channels, norm_type, num_groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, norm_type, num_groups)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.resConv(x) + h


def res_block(cin: int, cout: int, norm_type: str, num_groups: int) -> nn.Module:
    return (
        ResBlockX(cin, norm_type, num_groups) if cin == cout else ResBlockXY(cin, cout, norm_type, num_groups)
    )


class AttentionBlock(nn.Module):
    """GN → bias-free Linear(c→3·heads·dim_head) → SDPA over all voxels → 1×1×1 conv → residual."""

    def __init__(
        self, dim: int, heads: int = 4, dim_head: int = 32, norm_type: str = "group", num_groups: int = 24
    ):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        hidden = heads * dim_head
        self.norm = normalize(dim, norm_type, num_groups)
        self.to_qkv = nn.Linear(dim, hidden * 3, bias=False)
        self.to_out = nn.Conv3d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)  # (b, n, c)
        q, k, v = (
            u.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
            for u in self.to_qkv(t).chunk(3, dim=2)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale dim_head**-0.5 as official
        out = out.transpose(2, 3).reshape(b, self.heads * self.dim_head, d, h, w)
        return self.to_out(out) + x


def level_channels(n_hiddens: int, downsample: int) -> list[int]:
    """Encoder level widths: n·2^i for i < log2(ds), then the last one repeated ([48,96,192,192] at 8×)."""
    n = int(math.log2(downsample))
    ch = [n_hiddens * 2**i for i in range(n)]
    return ch + [ch[-1]]


class _MidBlock(nn.Module):
    def __init__(self, c: int, heads: int, dim_head: int, norm_type: str, num_groups: int):
        super().__init__()
        self.res1 = ResBlockX(c, norm_type, num_groups)
        self.attn = AttentionBlock(c, heads, dim_head, norm_type, num_groups)
        self.res2 = ResBlockX(c, norm_type, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


class _Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv_trans = nn.ConvTranspose3d(c, c, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_trans(x)


class _Level(nn.Module):
    def __init__(self, cin: int, cout: int, resample: nn.Module, norm_type: str, num_groups: int, up: bool):
        super().__init__()
        self.res1 = res_block(cin, cout, norm_type, num_groups)
        self.res2 = ResBlockX(cout, norm_type, num_groups)
        if up:
            self.up = resample
        else:
            self.down = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.res2(self.res1(x))
        return self.up(h) if hasattr(self, "up") else self.down(h)


class Encoder(nn.Module):
    def __init__(
        self,
        n_hiddens: int = 48,
        downsample: int = 8,
        image_channels: int = 1,
        norm_type: str = "group",
        num_groups: int = 24,
        embedding_dim: int = 8,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
    ):
        super().__init__()
        ch = level_channels(n_hiddens, downsample)
        self.conv_first = nn.Conv3d(image_channels, ch[0], 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            last = i == len(ch) - 1
            down = nn.Identity() if last else nn.Conv3d(cout, cout, 4, stride=2, padding=1)
            self.conv_blocks.append(_Level(cin, cout, down, norm_type, num_groups, up=False))
        self.mid_block = _MidBlock(ch[-1], attn_heads, attn_dim_head, norm_type, num_groups)
        self.final_block = nn.Sequential(
            normalize(ch[-1], norm_type, num_groups),
            nn.SiLU(),
            nn.Conv3d(ch[-1], embedding_dim, 3, padding=1),
        )
        self.out_channels = ch[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_first(x)
        for block in self.conv_blocks:
            h = block(h)
        return self.final_block(self.mid_block(h))


class Decoder(nn.Module):
    def __init__(
        self,
        n_hiddens: int = 48,
        downsample: int = 8,
        image_channels: int = 1,
        norm_type: str = "group",
        num_groups: int = 24,
        embedding_dim: int = 8,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
    ):
        super().__init__()
        ch = level_channels(n_hiddens, downsample)[::-1]
        self.conv_first = nn.Conv3d(embedding_dim, ch[0], 3, padding=1)
        self.mid_block = _MidBlock(ch[0], attn_heads, attn_dim_head, norm_type, num_groups)
        self.conv_blocks = nn.ModuleList()
        for i, cout in enumerate(ch):
            cin = ch[max(i - 1, 0)]
            last = i == len(ch) - 1
            up = nn.Identity() if last else _Upsample(cout)
            self.conv_blocks.append(_Level(cin, cout, up, norm_type, num_groups, up=True))
        self.final_block = nn.Sequential(
            normalize(ch[-1], norm_type, num_groups),
            nn.SiLU(),
            nn.Conv3d(ch[-1], image_channels, 3, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_first(z))
        for block in self.conv_blocks:
            h = block(h)
        return self.final_block(h)


def split_patches(
    x: torch.Tensor, patch: int, what: str = "volume"
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, C, D, H, W) → (B·p1·p2·p3, C, P, P, P) non-overlapping blocks, row-major over (p1, p2, p3).

    Every spatial dim must be a multiple of ``patch`` (the official ``unfold`` silently drops the
    remainder, spec §6.4).
    """
    if x.ndim != 5:
        raise ValueError(f"{what}: expected (B, C, D, H, W), got shape {tuple(x.shape)}")
    b, c, *s = x.shape
    if any(n % patch for n in s):
        raise ValueError(
            f"{what}: spatial shape {tuple(s)} is not a multiple of the patch size {patch} in every "
            f"dimension; crop or pad the volume to a multiple of {patch}"
        )
    g = tuple(n // patch for n in s)
    y = x.reshape(b, c, g[0], patch, g[1], patch, g[2], patch).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return y.reshape(b * g[0] * g[1] * g[2], c, patch, patch, patch), g


def merge_patches(y: torch.Tensor, batch: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`split_patches` for per-patch outputs (B·Πg, C, d, h, w) → (B, C, g0·d, …)."""
    n, c, d, h, w = y.shape
    y = y.reshape(batch, *grid, c, d, h, w).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return y.reshape(batch, c, grid[0] * d, grid[1] * h, grid[2] * w)


class PatchVolumeAE(nn.Module):
    """Encoder + pre-VQ conv + codebook + post-VQ conv + decoder.

    ``forward(x)`` (stage 1) reconstructs a patch batch; ``forward(x, patch=P)`` (stage 2, "joint
    decoder") encodes every P³ block alone, re-tiles the quantised latents and decodes the whole grid.
    """

    def __init__(
        self,
        n_hiddens: int = 48,
        downsample: int = 8,
        image_channels: int = 1,
        norm_type: str = "group",
        num_groups: int = 24,
        embedding_dim: int = 8,
        n_codes: int = 8192,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        commitment: float = 0.25,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-7,
        restart_thres: float = 1.0,
        random_restart: bool = True,
        codebook_init_buffer: bool = True,
        stage2_freeze: bool = True,
    ):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2, got {downsample}")
        kw = dict(
            n_hiddens=n_hiddens,
            downsample=downsample,
            image_channels=image_channels,
            norm_type=norm_type,
            num_groups=num_groups,
            embedding_dim=embedding_dim,
            attn_heads=attn_heads,
            attn_dim_head=attn_dim_head,
        )
        self.downsample = downsample
        self.embedding_dim = embedding_dim
        self.image_channels = image_channels
        self.encoder = Encoder(**kw)
        self.decoder = Decoder(**kw)
        self.pre_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, 1)
        self.post_vq_conv = nn.Conv3d(embedding_dim, embedding_dim, 1)
        self.codebook = Codebook(
            n_codes,
            embedding_dim,
            decay=ema_decay,
            eps=ema_eps,
            commitment=commitment,
            restart_thres=restart_thres,
            random_restart=random_restart,
            init_flag_buffer=codebook_init_buffer,
        )
        self.stage = 1
        self.stage2_freeze = stage2_freeze

    # ------------------------------------------------------------------------------ stages
    def frozen_modules(self) -> list[nn.Module]:
        return [self.encoder, self.pre_vq_conv, self.codebook]

    def set_stage(self, stage: int) -> PatchVolumeAE:
        """Stage 2 freezes encoder, pre-VQ conv and codebook (no grads; spec §1.3).

        With ``stage2_freeze`` (spec §6.1 fix, default) they also stay in eval mode and the codebook
        never updates, whatever ``train()`` is called later; without it they follow ``train()`` like the
        official code, whose logger callback re-enables codebook init/EMA/restarts.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        self.stage = stage
        frozen = stage == 2
        for m in self.frozen_modules():
            m.requires_grad_(not frozen)
        self.codebook.frozen = frozen and self.stage2_freeze
        return self.train(self.training)

    def train(self, mode: bool = True) -> PatchVolumeAE:
        super().train(mode)
        if self.stage == 2 and self.stage2_freeze:
            for m in self.frozen_modules():
                m.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the AE optimiser sees: everything in stage 1, decoder + post-VQ conv in stage 2."""
        if self.stage == 1:
            mods = [self.encoder, self.decoder, self.pre_vq_conv, self.post_vq_conv]
        else:
            mods = [self.decoder, self.post_vq_conv]
        return [p for m in mods for p in m.parameters()]

    # ------------------------------------------------------------------------------ API
    def encode(self, x: torch.Tensor, quantize: bool = True, include_embeddings: bool = False):
        """``pre_vq_conv(encoder(x))``; with ``quantize`` the code indices (and embeddings)."""
        h = self.pre_vq_conv(self.encoder(x))
        if not quantize:
            return h
        vq = self.codebook(h)
        return (vq["embeddings"], vq["encodings"]) if include_embeddings else vq["encodings"]

    def decode(self, latent: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Indices (integer tensor, or ``quantize=False`` like the official API) or continuous latents
        (``quantize=True``: nearest codes) → nearest code vectors → post-VQ conv → decoder."""
        if latent.dtype in (torch.int32, torch.int64):
            indices = latent.long()
        elif quantize:
            indices = self.codebook.indices(latent)
        else:
            raise ValueError(
                "decode(quantize=False) needs integer code indices; for continuous latents "
                "use decode_continuous() or quantize=True"
            )
        return self.decoder(self.post_vq_conv(self.codebook.lookup(indices)))

    def decode_continuous(self, z: torch.Tensor) -> torch.Tensor:
        """``decoder(post_vq_conv(z))`` with no quantisation."""
        return self.decoder(self.post_vq_conv(z))

    def patch_encode(
        self, x: torch.Tensor, quantize: bool = False, patch_size: int = 64, chunk: int | None = None
    ) -> torch.Tensor:
        return _patch_encode(self, x, patch=patch_size, quantize=quantize, chunk=chunk)

    def forward(
        self, x: torch.Tensor, patch: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if x.ndim != 5 or x.shape[1] != self.image_channels:
            raise ValueError(f"autoencoder expects (B, {self.image_channels}, D, H, W), got {tuple(x.shape)}")
        if patch is None:  # stage 1: the batch holds patches
            if any(s % self.downsample for s in x.shape[2:]):
                raise ValueError(
                    f"input spatial shape {tuple(x.shape[2:])} must be a multiple of "
                    f"the downsampling factor {self.downsample}"
                )
            vq = self.codebook(self.pre_vq_conv(self.encoder(x)))
            return self.decoder(self.post_vq_conv(vq["embeddings"])), vq
        patches, grid = split_patches(x, patch, "stage-2 volume")
        frozen = self.stage == 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            vq = self.codebook(self.pre_vq_conv(self.encoder(patches)))
        z = merge_patches(vq["embeddings"], x.shape[0], grid)
        return self.decoder(self.post_vq_conv(z)), vq

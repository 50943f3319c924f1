"""DiffAE networks (spec §1.1): semantic encoder, AdaGN-conditioned U-Net and the ``DiffAE`` wrapper.

Module names and indices mirror the official ``BeatGANsAutoencModel`` (phizaz/diffae) so that an official
state_dict converts by prefix mapping only (see ``convert.py``). Attention uses
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _ckpt

from medsynth_core.config import require


@dataclass
class ModelConfig:
    """Network hyper-parameters (official ``BeatGANsAutoencConfig`` names in brackets)."""

    image_size: int = 128  # [image_size]
    in_channels: int = 1  # [in_channels]
    out_channels: int = 1  # [out_channels]
    base_channels: int = 128  # [model_channels]; also the sinusoid width of the time embedding
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)  # [channel_mult]
    num_res_blocks: int = 2  # [num_res_blocks] per level on the way up is num_res_blocks + 1
    num_input_res_blocks: int | None = None  # [num_input_res_blocks] default num_res_blocks
    attention_resolutions: tuple[int, ...] = (16,)  # [attention_resolutions] in pixels
    embed_channels: int = 512  # [embed_channels] time-embedding width
    z_channels: int = 512  # [enc_out_channels] = [resnet_cond_channels]; z_sem width
    enc_channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4, 4)  # [enc_channel_mult]
    enc_num_res_blocks: int = 2  # [enc_num_res_block]
    enc_attention_resolutions: tuple[int, ...] | None = None  # [enc_attn_resolutions] default = decoder's
    num_heads: int = 1  # [num_heads]
    num_head_channels: int = -1  # [num_head_channels]
    dropout: float = 0.1  # [dropout]
    norm_groups: int = 32  # GroupNorm(min(norm_groups, C)); official is 32
    resblock_updown: bool = True  # [resblock_updown]

    def __post_init__(self) -> None:
        require(self.image_size >= 4, "model.image_size", "must be >= 4")
        require(len(self.channel_mult) >= 1, "model.channel_mult", "needs at least one level")
        require(
            self.image_size % 2 ** (len(self.channel_mult) - 1) == 0,
            "model.image_size",
            "must be divisible by 2**(len(channel_mult)-1)",
        )
        require(
            self.image_size % 2 ** (len(self.enc_channel_mult) - 1) == 0,
            "model.image_size",
            "must be divisible by 2**(len(enc_channel_mult)-1)",
        )
        require(self.norm_groups >= 1, "model.norm_groups", "must be >= 1")
        require(
            self.resblock_updown, "model.resblock_updown", "only the DiffAE setting (true) is implemented"
        )
        for w in {self.base_channels * m for m in self.channel_mult + self.enc_channel_mult}:
            require(
                w % min(self.norm_groups, w) == 0,
                "model.norm_groups",
                f"channel width {w} is not divisible by {min(self.norm_groups, w)} groups",
            )


def normalization(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm32(min(groups, channels), channels)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (spec §1.1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoid of raw t: cos half first, then sin (spec §1.1, checklist A4)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def zero_module(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


class ResBlock(nn.Module):
    """DiffAE ResBlock. ``conditioned``: AdaGN h·(1+s_t)+b_t then h·(1+s_z) (decoder); otherwise
    GN → SiLU → conv + skip with no second conv (encoder, a faithful detail, spec §1.1)."""

    def __init__(
        self,
        channels: int,
        out_channels: int,
        groups: int,
        dropout: float = 0.0,
        emb_channels: int | None = None,
        cond_channels: int | None = None,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.conditioned = emb_channels is not None
        self.in_layers = nn.Sequential(
            normalization(channels, groups), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.up, self.down = up, down
        if self.conditioned:
            self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
            self.cond_emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(cond_channels, out_channels))
            self.out_layers = nn.Sequential(
                normalization(out_channels, groups),
                nn.SiLU(),
                nn.Dropout(dropout),
                zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
            )
        self.skip_connection = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        lateral: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if lateral is not None:
            x = torch.cat([x, lateral], dim=1)
        if self.up or self.down:
            h = self.in_layers[:-1](x)
            h = self._resample(h)
            x = self._resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        if self.conditioned:
            h = self.out_layers[0](h)
            if emb is not None:
                scale, shift = self.emb_layers(emb).type(h.dtype)[..., None, None].chunk(2, dim=1)
                h = h * (1 + scale) + shift
            if cond is not None:
                h = h * (1 + self.cond_emb_layers(cond).type(h.dtype)[..., None, None])
            h = self.out_layers[1:](h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels (legacy QKV head layout of guided-diffusion), computed with SDPA;
    zero-initialised output projection."""

    def __init__(self, channels: int, groups: int, num_heads: int = 1, num_head_channels: int = -1):
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.norm = normalization(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        n = x.shape[-1]
        ch = c // self.num_heads
        q, k, v = qkv.reshape(b, self.num_heads, 3 * ch, n).transpose(-1, -2).split(ch, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, ch); scale 1/sqrt(ch) as the official
        h = h.transpose(-1, -2).reshape(b, c, n)
        return (x + self.proj_out(h)).reshape(b, c, *spatial)


class EmbedSequential(nn.ModuleList):
    """Official ``TimestepEmbedSequential``: passes (emb, cond, lateral) to ResBlocks."""

    def forward(self, x, emb=None, cond=None, lateral=None):
        for i, layer in enumerate(self):
            if isinstance(layer, ResBlock):
                x = layer(x, emb=emb, cond=cond, lateral=lateral if i == 0 else None)
            else:
                x = layer(x)
        return x


class SemanticEncoder(nn.Module):
    """Half-UNet encoder (no time input) → GN → SiLU → global average pool → 1×1 conv → z_sem (spec §1.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g = cfg.norm_groups
        attn = cfg.enc_attention_resolutions or cfg.attention_resolutions
        ch = cfg.enc_channel_mult[0] * cfg.base_channels
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        res = cfg.image_size
        for level, mult in enumerate(cfg.enc_channel_mult):
            for _ in range(cfg.enc_num_res_blocks):
                out = mult * cfg.base_channels
                layers: list[nn.Module] = [ResBlock(ch, out, g, cfg.dropout)]
                ch = out
                if res in attn:
                    layers.append(AttentionBlock(ch, g, cfg.num_heads, cfg.num_head_channels))
                self.input_blocks.append(EmbedSequential(layers))
            if level != len(cfg.enc_channel_mult) - 1:
                res //= 2
                self.input_blocks.append(EmbedSequential([ResBlock(ch, ch, g, cfg.dropout, down=True)]))
        self.middle_block = EmbedSequential(
            [
                ResBlock(ch, ch, g, cfg.dropout),
                AttentionBlock(ch, g, cfg.num_heads, cfg.num_head_channels),
                ResBlock(ch, ch, g, cfg.dropout),
            ]
        )
        self.out = nn.Sequential(
            normalization(ch, g),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Conv2d(ch, cfg.z_channels, 1),
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for block in self.input_blocks:
            h = block(h)
        h = self.middle_block(h)
        return self.out(h)


class ConditionalUNet(nn.Module):
    """ε-prediction U-Net with AdaGN time scale/shift and z_sem scale (spec §1.1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        g = cfg.norm_groups
        mc = cfg.base_channels
        self.base_channels = mc
        emb, zc = cfg.embed_channels, cfg.z_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        n_levels = len(cfg.channel_mult)
        n_in = cfg.num_input_res_blocks or cfg.num_res_blocks

        def rb(c_in, c_out, **kw):
            return ResBlock(c_in, c_out, g, cfg.dropout, emb_channels=emb, cond_channels=zc, **kw)

        def at(c):
            return AttentionBlock(c, g, cfg.num_heads, cfg.num_head_channels)

        ch = cfg.channel_mult[0] * mc
        self.input_blocks = nn.ModuleList([EmbedSequential([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        chans: list[list[int]] = [[] for _ in range(n_levels)]
        chans[0].append(ch)
        self.input_counts = [0] * n_levels
        self.input_counts[0] = 1
        res = cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(n_in):
                layers: list[nn.Module] = [rb(ch, mult * mc)]
                ch = mult * mc
                if res in cfg.attention_resolutions:
                    layers.append(at(ch))
                self.input_blocks.append(EmbedSequential(layers))
                chans[level].append(ch)
                self.input_counts[level] += 1
            if level != n_levels - 1:
                res //= 2
                self.input_blocks.append(EmbedSequential([rb(ch, ch, down=True)]))
                chans[level + 1].append(ch)
                self.input_counts[level + 1] += 1
        self.middle_block = EmbedSequential([rb(ch, ch), at(ch), rb(ch, ch)])
        self.output_blocks = nn.ModuleList()
        self.output_counts = [0] * n_levels
        self.has_lateral: list[bool] = []
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                ich = chans[level].pop() if chans[level] else 0
                layers = [rb(ch + ich, mc * mult)]
                ch = mc * mult
                if res in cfg.attention_resolutions:
                    layers.append(at(ch))
                if level and i == cfg.num_res_blocks:
                    res *= 2
                    layers.append(rb(ch, ch, up=True))
                self.output_blocks.append(EmbedSequential(layers))
                self.output_counts[level] += 1
                self.has_lateral.append(ich > 0)
        self.out = nn.Sequential(
            normalization(ch, g), nn.SiLU(), zero_module(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        )

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(timestep_embedding(t, self.base_channels))

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """ε̂(x_t, t, z_sem); ``t`` is the raw integer timestep (no rescaling, spec §1.2)."""
        emb = self.embed_time(t)
        hs: list[list[torch.Tensor]] = [[] for _ in self.input_counts]
        h = x
        k = 0
        for level, n in enumerate(self.input_counts):
            for _ in range(n):
                h = self.input_blocks[k](h, emb=emb, cond=z)
                hs[level].append(h)
                k += 1
        h = self.middle_block(h, emb=emb, cond=z)
        k = 0
        for i, n in enumerate(self.output_counts[::-1]):
            level = len(self.output_counts) - 1 - i
            for _ in range(n):
                lateral = hs[level].pop() if hs[level] else None
                h = self.output_blocks[k](h, emb=emb, cond=z, lateral=lateral)
                k += 1
        return self.out(h)


class DiffAE(nn.Module):
    """Semantic encoder + conditional U-Net. Sampling lives in :mod:`mgdcr.diffusion`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = SemanticEncoder(cfg)
        self.unet = ConditionalUNet(cfg)

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """z_sem = Enc(x_0), (B, z_channels)."""
        return self.encoder(x0)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor | None = None,
        x_start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if z is None:
            if x_start is None:
                raise ValueError("DiffAE.forward needs z (z_sem) or x_start to encode")
            z = self.encode(x_start)
        return self.unet(x_t, t, z)

    def _diffusion(self, diffusion):
        from .diffusion import GaussianDiffusion

        return diffusion if diffusion is not None else GaussianDiffusion()

    def encode_stochastic(
        self,
        x0: torch.Tensor,
        z: torch.Tensor | None = None,
        steps: int = 30,
        diffusion=None,
        grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_T, z_sem) of images in [-1,1] by DDIM inversion over ``ddim{steps}`` (spec §1.2)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            z = self.encode(x0) if z is None else z
        s = self._diffusion(diffusion).sampler(steps)
        return s.encode(self.eps_fn(z), x0, grad=grad), z

    def decode(
        self,
        x_T: torch.Tensor,
        z: torch.Tensor,
        steps: int = 30,
        grad: bool = False,
        checkpoint: bool = False,
        diffusion=None,
    ) -> torch.Tensor:
        """Deterministic DDIM decode (η = 0, x̂₀ clipped) of (x_T, z_sem) → images in [-1,1]."""
        s = self._diffusion(diffusion).sampler(steps)
        return s.decode(self.eps_fn(z, checkpoint), x_T, grad=grad)

    def loss(self, x0: torch.Tensor, diffusion=None) -> torch.Tensor:
        """Training loss with t ~ U{0..T−1} and ε ~ N(0, I) from the global RNG (spec §1.2)."""
        d = self._diffusion(diffusion)
        t = torch.randint(0, d.T, (x0.shape[0],), device=x0.device)
        return d.loss(self, x0, t, torch.randn_like(x0))

    def eps_fn(self, z: torch.Tensor, use_checkpoint: bool = False):
        """Closure ε̂(x, t) with a fixed z for the samplers (optionally gradient-checkpointed)."""

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if use_checkpoint and torch.is_grad_enabled():
                return _ckpt(self.unet, x, t, z, use_reentrant=False)
            return self.unet(x, t, z)

        return fn


PRESETS: dict[str, dict] = {
    # spec §1.1: ffhq128 network with 1 channel; 128,538,241 parameters
    "paper": {},
    # spec §8 demo: 32 px; 1,185,473 parameters (the spec's 1.19 M implies the DiffAE default of 2 encoder
    # res blocks per level; "1 res block" is the decoder's)
    "demo": dict(
        image_size=32,
        base_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        embed_channels=128,
        z_channels=64,
        enc_channel_mult=(1, 2, 2),
        enc_num_res_blocks=2,
        dropout=0.0,
        norm_groups=32,
    ),
    # spec §8 CI micro: 16 px; ~0.30 M parameters
    "micro": dict(
        image_size=16,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        embed_channels=64,
        z_channels=32,
        enc_channel_mult=(1, 2, 2),
        enc_num_res_blocks=2,
        dropout=0.0,
        norm_groups=8,
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def build_model(cfg: ModelConfig) -> DiffAE:
    return DiffAE(cfg)


__all__ = [
    "AttentionBlock",
    "ConditionalUNet",
    "DiffAE",
    "LatentMLP",
    "ModelConfig",
    "ResBlock",
    "SemanticEncoder",
    "build_model",
    "preset",
    "timestep_embedding",
]


# ------------------------------------------------------------------------------------------------------------
# optional latent DDIM on z_sem (spec §1.4; off by default)
class _MLPLNAct(nn.Module):
    """Linear → ×(condition_bias + Linear(SiLU(t_emb))) → LayerNorm → SiLU (official ``MLPLNAct``)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        cond_channels: int,
        norm: bool,
        cond: bool,
        act: bool,
        condition_bias: float,
        dropout: float,
    ):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out)
        self.act = nn.SiLU() if act else nn.Identity()
        self.use_cond = cond
        if cond:
            self.cond_layers = nn.Sequential(
                nn.SiLU() if act else nn.Identity(), nn.Linear(cond_channels, c_out)
            )
        self.norm = nn.LayerNorm(c_out) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.condition_bias = condition_bias
        if act:  # official init for SiLU layers: kaiming normal (relu gain)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.kaiming_normal_(m.weight, a=0, nonlinearity="relu")

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        if self.use_cond:
            x = x * (self.condition_bias + self.cond_layers(cond))
        return self.dropout(self.act(self.norm(x)))


class LatentMLP(nn.Module):
    """MLP-skip ε-network on z_sem (official ``MLPSkipNet``): ``num_layers`` layers of width ``hidden``, z
    re-concatenated at layers 1…L−1, time embedding sinusoid(``time_channels``) → Linear-SiLU-Linear to z width."""

    def __init__(
        self,
        z_channels: int,
        num_layers: int = 10,
        hidden: int = 2048,
        time_channels: int = 64,
        condition_bias: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.time_channels = time_channels
        self.time_embed = nn.Sequential(
            nn.Linear(time_channels, z_channels), nn.SiLU(), nn.Linear(z_channels, z_channels)
        )
        self.skip = set(range(1, num_layers))
        layers = []
        for i in range(num_layers):
            last = i == num_layers - 1
            a = z_channels if i == 0 else hidden
            b = z_channels if last else hidden
            if i in self.skip:
                a += z_channels
            layers.append(
                _MLPLNAct(
                    a,
                    b,
                    z_channels,
                    norm=not last,
                    cond=not last,
                    act=not last,
                    condition_bias=condition_bias,
                    dropout=0.0 if last else dropout,
                )
            )
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.time_embed(timestep_embedding(t, self.time_channels))
        h = x
        for i, layer in enumerate(self.layers):
            if i in self.skip:
                h = torch.cat([h, x], dim=1)
            h = layer(h, cond)
        return h

"""BiFlowNet denoiser (spec §2): an inter-patch 3D U-Net over the whole latent plus an intra-patch DiT over
non-overlapping latent sub-volumes whose unpatchified features are added into the full-resolution U-Net levels.

Tensors are ``(B, C, D, H, W)``. ``BiFlowNet(x_t, t, y=, res=)`` returns ε̂ with the shape of ``x_t``.
``controls`` (six tensors from :class:`meddiffusion3d.controlnet.ControlNet`) are added to the skips and to
the mid output when given (spec §4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn

__all__ = [
    "CLASS_NAMES",
    "OFFICIAL_LATENT_SHAPES",
    "BiFlowNet",
    "DiTBlock",
    "FinalLayer",
    "ResBlock",
    "SpatialAttention",
    "count_parameters_meta",
    "resolution_code",
    "sincos_pos_embed_3d",
    "timestep_embedding",
]

PAPER_KWARGS: dict[str, Any] = dict(
    channels=8,
    dim=72,
    dim_mults=(1, 1, 2, 4, 8),
    use_attn=(0, 0, 0, 1, 1),
    attn_heads=8,
    attn_dim_head=32,
    resnet_groups=24,
    classes=7,
    res_condition=True,
    sub_volume=(8, 8, 8),
    dit_patch=1,
    dit_heads=8,
    mlp_ratio=4.0,
    num_mid_dit=1,
)


# spec §2, "Class": the 7 modality/anatomy classes of the released models
CLASS_NAMES: tuple[str, ...] = (
    "CTHeadNeck",
    "CTChestAbdomen",
    "CTLegs",
    "MRBrainT1",
    "MRBrainT2",
    "MRAbdomen",
    "MRKnee",
)
# latent shapes the official evaluation scripts sample per class (evaluation/class_conditional_generation*.py)
OFFICIAL_LATENT_SHAPES: dict[str, dict[int, list[tuple[int, int, int]]]] = {
    "8x": {0: [(32, 32, 32), (16, 32, 32)], 1: [(32, 32, 32), (64, 64, 64)], 2: [(32, 32, 32), (64, 32, 32)],
           3: [(24, 24, 24)], 4: [(24, 24, 24)], 5: [(16, 32, 32)], 6: [(8, 40, 40)]},
    "4x": {0: [(64, 64, 64), (32, 64, 64)], 1: [(64, 64, 64), (128, 128, 128)], 2: [(64, 64, 64), (128, 64, 64)],
           3: [(48, 48, 48)], 4: [(48, 48, 48)], 5: [(32, 64, 64)], 6: [(16, 80, 80)]},
}  # fmt: skip


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 3:
        raise ValueError(f"{name} must be an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def resolution_code(latent_shape: Sequence[int], batch: int = 1, device: Any = None) -> torch.Tensor:
    """Resolution condition of the official training script: ``latent_shape / 64`` per axis (spec §2)."""
    r = torch.tensor([float(s) / 64.0 for s in latent_shape], device=device)
    return r.unsqueeze(0).expand(batch, 3).contiguous()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding: dim/2 sines then dim/2 cosines, frequencies exp(−ln(1e4)·k/(dim/2−1)) (spec §2)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000.0) / (half - 1)))
    arg = t.float()[:, None] * freqs[None, :]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class SinusoidalEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"time embedding width must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


def sincos_pos_embed_3d(embed_dim: int, grid: Sequence[int]) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding (embed_dim/3 per axis, each half sin half cos), ``(N, embed_dim)``
    with tokens in (D, H, W) raster order (spec §2, "Tokens")."""
    if embed_dim % 6:
        raise ValueError(
            f"the DiT hidden size must be divisible by 6 for the 3D sin-cos embedding, got {embed_dim}"
        )
    d_axis = embed_dim // 3
    coords = np.meshgrid(*[np.arange(g, dtype=np.float64) for g in grid], indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(d_axis // 2, dtype=np.float64) / (d_axis / 2.0))
    parts = []
    for c in coords:
        out = np.einsum("m,d->md", c.reshape(-1), omega)
        parts.append(np.concatenate([np.sin(out), np.cos(out)], axis=1))
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------- U-Net blocks
class ResBlock(nn.Module):
    """[Conv3³ → GN → FiLM x·(1+s)+b → SiLU] → [Conv3³ → GN → SiLU] + skip (1×1×1 conv if i≠o) (spec §2)."""

    def __init__(self, dim_in: int, dim_out: int, cond_dim: int | None, groups: int):
        super().__init__()
        self.film = nn.Linear(cond_dim, 2 * dim_out) if cond_dim is not None else None
        self.conv1 = nn.Conv3d(dim_in, dim_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, dim_out)
        self.conv2 = nn.Conv3d(dim_out, dim_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, dim_out)
        self.skip = nn.Conv3d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        if self.film is not None:
            if c is None:
                raise ValueError("ResBlock with FiLM needs the condition vector c")
            scale, shift = self.film(F.silu(c))[:, :, None, None, None].chunk(2, dim=1)
            h = h * (scale + 1) + shift
        h = F.silu(h)
        h = F.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class SpatialAttention(nn.Module):
    """Residual(channel-LayerNorm (gain only, eps 1e-5) → bias-free qkv → SDPA over all voxels → 1×1 conv)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.gain = nn.Parameter(torch.ones(1, dim, 1, 1, 1))
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Conv3d(heads * dim_head, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        xn = (x - mean) / (var + 1e-5).sqrt() * self.gain
        tokens = xn.flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = (
            t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
            for t in self.to_qkv(tokens).chunk(3, dim=-1)
        )
        out = F.scaled_dot_product_attention(q, k, v)  # scale dim_head^-0.5
        out = out.transpose(2, 3).reshape(b, self.heads * self.dim_head, d, h, w)
        return x + self.to_out(out)


class _Level(nn.Module):
    """One U-Net level: ResBlock, [attention], ResBlock, [attention], optional resampler."""

    def __init__(
        self,
        res1: ResBlock,
        res2: ResBlock,
        attn1: nn.Module | None,
        attn2: nn.Module | None,
        resample: nn.Module | None,
    ):
        super().__init__()
        self.res1, self.res2 = res1, res2
        self.attn1 = attn1 if attn1 is not None else nn.Identity()
        self.attn2 = attn2 if attn2 is not None else nn.Identity()
        self.resample = resample


# ----------------------------------------------------------------------------------------- DiT blocks
class DiTBlock(nn.Module):
    """adaLN-Zero DiT block (timm Attention/Mlp); ``skip=True`` adds the U-ViT skip Linear(2h→h) (spec §2)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, cond_dim: int, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * hidden, hidden) if skip else None
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = TimmAttention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.ada_ln = nn.Linear(cond_dim, 6 * hidden)

    def forward(self, x: torch.Tensor, mod_c: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        """``mod_c`` is SiLU(c) already repeated per sub-volume, shape (B·n_sub, cond_dim)."""
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("a skip DiT block needs the tokens of its input block")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada_ln(mod_c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), sh1, sc1))
        x = x + g2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), sh2, sc2))
        return x


class FinalLayer(nn.Module):
    """LN → adaLN shift/scale → Linear(h → p³·h): tokens back to per-voxel features (spec §2, "Fusion")."""

    def __init__(self, hidden: int, patch: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch**3 * out_channels)
        self.ada_ln = nn.Linear(cond_dim, 2 * hidden)

    def forward(self, x: torch.Tensor, mod_c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(mod_c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm(x), shift, scale))


class _DiTStage(nn.Module):
    def __init__(self, block: DiTBlock, final: FinalLayer):
        super().__init__()
        self.block, self.final = block, final


# ----------------------------------------------------------------------------------------- BiFlowNet
class BiFlowNet(nn.Module):
    """BiFlowNet (spec §2). Defaults are the paper's 8× model (157,654,880 parameters with ``dit_patch=1``).

    Args:
        channels: latent channels (8). dim: base width (72). dim_mults / use_attn: per U-Net level.
        attn_heads / attn_dim_head: U-Net attention (8 × 32). resnet_groups: GroupNorm groups (24).
        classes: number of classes (7) or ``None`` for an unconditional model. res_condition: resolution MLP.
        sub_volume: latent sub-volume of one DiT sequence (8³). dit_patch: DiT patch size (1 for 8×, 2 for 4×).
        dit_heads, mlp_ratio, num_mid_dit: DiT settings. learn_sigma: output 2·channels.
        init_kernel_size: stem kernel (3). null_class: add an extra "no class" embedding row (index ``classes``)
        for classifier-free guidance; **off** for the paper/official model (spec §3: no CFG).
    """

    def __init__(
        self,
        channels: int = 8,
        dim: int = 72,
        dim_mults: Sequence[int] = (1, 1, 2, 4, 8),
        use_attn: Sequence[int] = (0, 0, 0, 1, 1),
        attn_heads: int = 8,
        attn_dim_head: int = 32,
        resnet_groups: int = 24,
        classes: int | None = 7,
        res_condition: bool = True,
        sub_volume: int | Sequence[int] = 8,
        dit_patch: int = 1,
        dit_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_mid_dit: int = 1,
        learn_sigma: bool = False,
        init_kernel_size: int = 3,
        null_class: bool = False,
    ):
        super().__init__()
        dim_mults, use_attn = tuple(int(m) for m in dim_mults), tuple(bool(a) for a in use_attn)
        # constructor arguments, for cloning (ControlNet) and summaries
        self.config: dict[str, Any] = dict(
            channels=channels,
            dim=dim,
            dim_mults=dim_mults,
            use_attn=tuple(int(a) for a in use_attn),
            attn_heads=attn_heads,
            attn_dim_head=attn_dim_head,
            resnet_groups=resnet_groups,
            classes=classes,
            res_condition=res_condition,
            sub_volume=_triple(sub_volume, "sub_volume"),
            dit_patch=dit_patch,
            dit_heads=dit_heads,
            mlp_ratio=mlp_ratio,
            num_mid_dit=num_mid_dit,
            learn_sigma=learn_sigma,
            init_kernel_size=init_kernel_size,
            null_class=null_class,
        )
        if len(use_attn) != len(dim_mults):
            raise ValueError(f"use_attn {use_attn} must have one entry per dim_mults level {dim_mults}")
        if init_kernel_size % 2 != 1:
            raise ValueError(f"init_kernel_size must be odd, got {init_kernel_size}")
        if null_class and not classes:
            raise ValueError("null_class (classifier-free guidance) needs a class-conditional model")
        self.channels, self.dim = channels, dim
        self.out_channels = 2 * channels if learn_sigma else channels
        self.classes = classes if classes else None
        self.null_class = bool(null_class)
        self.res_condition = bool(res_condition)
        self.sub_volume = _triple(sub_volume, "sub_volume")
        self.patch = int(dit_patch)
        if any(s % self.patch for s in self.sub_volume):
            raise ValueError(f"sub_volume {self.sub_volume} must be divisible by dit_patch {self.patch}")

        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        n_levels = len(in_out)
        # Number of DiT input/output stages = number of leading U-Net levels that keep the width (official rule);
        # those levels run at full resolution and receive the DiT features (spec §2, "Fusion").
        self.n_fusion = sum(int(i == o) for i, o in in_out)
        if self.n_fusion < 1 or any(i != o for i, o in in_out[: self.n_fusion]):
            raise ValueError(
                f"dim_mults {dim_mults} must start with 1 (the leading width-1 levels get DiT features)"
            )
        self.n_down = n_levels - self.n_fusion
        mult = 2**self.n_down
        self.shape_multiple = tuple(math.lcm(s, mult) for s in self.sub_volume)

        # --- conditioning: time (+ class) ‖ resolution (spec §2, "Conditioning")
        time_dim = 4 * dim
        self.time_mlp = nn.Sequential(
            SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim)
        )
        self.class_embed = (
            nn.Embedding(self.classes + int(self.null_class), time_dim) if self.classes else None
        )
        self.res_mlp = (
            nn.Sequential(nn.Linear(3, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            if self.res_condition
            else None
        )
        cond_dim = 2 * time_dim if self.res_condition else time_dim
        self.cond_dim = cond_dim

        # --- intra-patch flow (DiT)
        self.stem = nn.Conv3d(channels, dim, init_kernel_size, padding=init_kernel_size // 2)
        self.patch_embed = nn.Conv3d(channels, dim, self.patch, stride=self.patch)
        self.token_grid = tuple(s // self.patch for s in self.sub_volume)
        n_tokens = int(np.prod(self.token_grid))
        # fixed sin-cos embedding; a frozen Parameter as officially (it counts in the 157,654,880)
        self.pos_embed = nn.Parameter(sincos_pos_embed_3d(dim, self.token_grid)[None], requires_grad=False)
        assert self.pos_embed.shape[1] == n_tokens
        self.dit_in = nn.ModuleList(
            _DiTStage(
                DiTBlock(dim, dit_heads, mlp_ratio, cond_dim), FinalLayer(dim, self.patch, dim, cond_dim)
            )
            for _ in range(self.n_fusion)
        )
        self.dit_mid = nn.ModuleList(
            DiTBlock(dim, dit_heads, mlp_ratio, cond_dim) for _ in range(num_mid_dit)
        )
        self.dit_out = nn.ModuleList(
            _DiTStage(
                DiTBlock(dim, dit_heads, mlp_ratio, cond_dim, skip=True),
                FinalLayer(dim, self.patch, dim, cond_dim),
            )
            for _ in range(self.n_fusion)
        )

        # --- inter-patch flow (3D U-Net)
        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, cond_dim, resnet_groups)

        def attn(c: int) -> SpatialAttention:
            return SpatialAttention(c, attn_heads, attn_dim_head)

        self.downs = nn.ModuleList()
        for ind, (di, do) in enumerate(in_out):
            has_down = ind >= self.n_fusion - 1 and ind < n_levels - 1
            a = use_attn[ind]
            self.downs.append(
                _Level(
                    res(di, do),
                    res(do, do),
                    attn(do) if a else None,
                    attn(do) if a else None,
                    nn.Conv3d(do, do, 4, 2, 1) if has_down else None,
                )
            )
        mid = dims[-1]
        self.mid_res1, self.mid_attn, self.mid_res2 = res(mid, mid), attn(mid), res(mid, mid)
        self.ups = nn.ModuleList()
        for ind, (di, do) in enumerate(reversed(in_out)):
            has_up = ind < n_levels - self.n_fusion
            a = use_attn[n_levels - 1 - ind]
            self.ups.append(
                _Level(
                    res(2 * do, do),
                    res(2 * do, di),
                    attn(do) if a else None,
                    attn(di) if a else None,
                    nn.ConvTranspose3d(di, di, 4, 2, 1) if has_up else None,
                )
            )
        self.head_res = ResBlock(2 * dim, dim, None, resnet_groups)
        self.head_out = nn.Conv3d(dim, self.out_channels, 1)
        self.level_channels = [do for _, do in in_out]
        self.reset_parameters()

    # ------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Official init (spec §2, "Init"): Xavier-uniform on every Linear with zero bias, Xavier on the flattened
        patch-embed, adaLN and FinalLayer linears at 0 so that the DiT path adds exactly 0 at init."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        if w.device.type != "meta":
            with torch.no_grad():
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for m in self.modules():
            if isinstance(m, (DiTBlock, FinalLayer)):
                nn.init.zeros_(m.ada_ln.weight)
                nn.init.zeros_(m.ada_ln.bias)
            if isinstance(m, FinalLayer):
                nn.init.zeros_(m.linear.weight)
                nn.init.zeros_(m.linear.bias)

    # ------------------------------------------------------------------------------------- helpers
    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.channels:
            raise ValueError(
                f"BiFlowNet expects a latent (B, {self.channels}, D, H, W), got {tuple(x.shape)}"
            )
        bad = [s for s, m in zip(x.shape[2:], self.shape_multiple, strict=True) if s % m]
        if bad:
            raise ValueError(
                f"latent spatial shape {tuple(x.shape[2:])} must be divisible by {self.shape_multiple} per axis "
                f"(sub-volume {self.sub_volume} and {self.n_down} down-samplings); pad or crop the volume so that "
                f"each latent dim is a multiple of {max(self.shape_multiple)}"
            )

    def condition(
        self, t: torch.Tensor, y: torch.Tensor | None = None, res: torch.Tensor | None = None
    ) -> torch.Tensor:
        """c = [time_mlp(t) + class_embed(y) ‖ res_mlp(res)] (spec §2, "Conditioning")."""
        c = self.time_mlp[1:](self.time_mlp[0](t).to(self.time_mlp[1].weight.dtype))
        if self.class_embed is not None:
            if y is None:
                raise ValueError("this BiFlowNet is class-conditional: pass y (class indices, shape (B,))")
            y = y.long().reshape(-1)
            if y.shape[0] != c.shape[0]:
                raise ValueError(f"y has {y.shape[0]} entries for a batch of {c.shape[0]}")
            n = self.class_embed.num_embeddings
            if int(y.min()) < 0 or int(y.max()) >= n:
                raise ValueError(f"class index out of range [0, {n}): {y.tolist()}")
            c = c + self.class_embed(y)
        elif y is not None:
            raise ValueError("this BiFlowNet is unconditional (classes=None) but y was given")
        if self.res_mlp is not None:
            if res is None:
                raise ValueError(
                    "this BiFlowNet uses resolution conditioning: pass res = latent_shape/64, (B, 3)"
                )
            res = res.to(c.dtype)
            if res.ndim == 1:
                res = res.unsqueeze(0)
            if res.shape[0] == 1 and c.shape[0] > 1:
                res = res.expand(c.shape[0], 3)
            c = torch.cat((c, self.res_mlp(res)), dim=1)
        return c

    def _to_sub_volumes(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, d, h, w = x.shape
        sd, sh, sw = self.sub_volume
        x = x.reshape(b, ch, d // sd, sd, h // sh, sh, w // sw, sw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, ch, sd, sh, sw)  # (B·n_sub, C, sd, sh, sw)

    def _from_tokens(self, tok: torch.Tensor, b: int, grid: tuple[int, int, int]) -> torch.Tensor:
        """FinalLayer tokens (B·n_sub, N, p³·C) → unpatchify each sub-volume → re-tile to (B, C, D, H, W)."""
        p, c = self.patch, self.dim
        gx, gy, gz = self.token_grid
        v = tok.reshape(-1, gx, gy, gz, p, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        v = v.reshape(b, *grid, c, gx * p, gy * p, gz * p)
        v = v.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return v.reshape(b, c, grid[0] * gx * p, grid[1] * gy * p, grid[2] * gz * p)

    def intra_patch_flow(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        inputs_only: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the DiT on every sub-volume; return (input-stage features, output-stage features), each a list of
        (B, dim, D, H, W) tensors. ``inputs_only`` stops after the input stages (the ControlNet clone)."""
        b = x.shape[0]
        grid = tuple(s // v for s, v in zip(x.shape[2:], self.sub_volume, strict=True))
        n_sub = grid[0] * grid[1] * grid[2]
        mod_c = F.silu(c).repeat_interleave(n_sub, dim=0)  # c repeated for every sub-volume
        tok = self.patch_embed(self._to_sub_volumes(x)).flatten(2).transpose(1, 2) + self.pos_embed
        skips, f_in, f_out = [], [], []
        for stage in self.dit_in:
            tok = stage.block(tok, mod_c)
            skips.append(tok)
            f_in.append(self._from_tokens(stage.final(tok, mod_c), b, grid))
        if inputs_only:
            return f_in, f_out
        for blk in self.dit_mid:
            tok = blk(tok, mod_c)
        for stage in self.dit_out:
            tok = stage.block(tok, mod_c, skips.pop())  # U-ViT skip, LIFO
            f_out.append(self._from_tokens(stage.final(tok, mod_c), b, grid))
        return f_in, f_out

    # ------------------------------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        controls: Sequence[torch.Tensor] | None = None,
        control_scales: Sequence[float] | None = None,
    ) -> torch.Tensor:
        self.check_input(x)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = self.condition(t, y, res)
        f_in, f_out = self.intra_patch_flow(x, c)
        if controls is not None and len(controls) != len(self.downs) + 1:
            raise ValueError(f"expected {len(self.downs) + 1} control tensors, got {len(controls)}")
        scales = list(control_scales) if control_scales is not None else [1.0] * (len(self.downs) + 1)

        h = self.stem(x)
        r = h
        skips: list[torch.Tensor] = []
        for ind, lvl in enumerate(self.downs):
            if ind < self.n_fusion:
                h = h + f_in[ind]
            h = lvl.attn1(lvl.res1(h, c))
            skips.append(h)
            h = lvl.attn2(lvl.res2(h, c))
            skips.append(h)
            if lvl.resample is not None:
                h = lvl.resample(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, c)), c)
        if controls is not None:
            h = h + scales[-1] * controls[-1]
        n_up = len(self.ups)
        for ind, lvl in enumerate(self.ups):
            if ind >= n_up - self.n_fusion:
                h = h + f_out[ind - (n_up - self.n_fusion)]
            s = skips.pop()
            # spec §4: the first skip popped (the level's second ResBlock) gets that level's control
            if controls is not None:
                level = n_up - 1 - ind
                s = s + scales[level] * controls[level]
            h = lvl.attn1(lvl.res1(torch.cat((h, s), dim=1), c))
            h = lvl.attn2(lvl.res2(torch.cat((h, skips.pop()), dim=1), c))
            if lvl.resample is not None:
                h = lvl.resample(h)
        return self.head_out(self.head_res(torch.cat((h, r), dim=1)))

    def dit_parameters(self) -> int:
        """Parameters of the DiT blocks and FinalLayers (spec §2: 1,934,856 at the 8× paper size)."""
        mods = [self.dit_in, self.dit_mid, self.dit_out]
        return sum(p.numel() for m in mods for p in m.parameters())


def count_parameters_meta(**kwargs: Any) -> int:
    """Parameter count of ``BiFlowNet(**kwargs)`` built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        net = BiFlowNet(**kwargs)
    return sum(p.numel() for p in net.parameters())

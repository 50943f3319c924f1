"""The CoMod discriminator of Uni-COAL (spec §4): residual blocks, minibatch std, and the projection epilogue
conditioned on the target modality and slice position. Parameter names equal the official ones."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import DiscriminatorConfig
from .layers import Conv2dLayer, FullyConnectedLayer, MappingNetwork

# ----------------------------------------------------------------------------------- discriminator


class DiscriminatorBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        tmp_channels: int,
        out_channels: int,
        resolution: int,
        img_channels: int,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(
                img_channels, tmp_channels, 1, activation="lrelu", conv_clamp=conv_clamp
            )
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu", conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(
            tmp_channels, out_channels, 3, activation="lrelu", down=2, conv_clamp=conv_clamp
        )
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: torch.Tensor | None, img: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 0:
            y = self.fromrgb(img)
            x = x + y if x is not None else y
        y = self.skip(x, gain=np.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=np.sqrt(0.5))
        return y + x


class MinibatchStdLayer(nn.Module):
    def __init__(self, group_size: int, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = min(self.group_size, n)
        if n % g != 0:
            raise ValueError(f"minibatch-std: batch {n} is not divisible by the group size {g}")
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)
        y = (y - y.mean(dim=0)).square().mean(dim=0)
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4]).reshape(-1, f, 1, 1).repeat(g, 1, h, w)
        return torch.cat([x, y], dim=1)


class DiscriminatorEpilogue(nn.Module):
    def __init__(
        self,
        in_channels: int,
        cmap_dim: int,
        resolution: int,
        mbstd_group: int,
        mbstd_channels: int,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.cmap_dim = cmap_dim
        self.mbstd = MinibatchStdLayer(mbstd_group, mbstd_channels) if mbstd_channels > 0 else None
        self.conv = Conv2dLayer(
            in_channels + mbstd_channels, in_channels, 3, activation="lrelu", conv_clamp=conv_clamp
        )
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: torch.Tensor, cmap: torch.Tensor | None) -> torch.Tensor:
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:  # projection conditioning (spec §4)
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / np.sqrt(self.cmap_dim))
        return x


class CoModDiscriminator(nn.Module):
    """StyleGAN2 resnet D on cat(A, B) with logit = <out, M_D(c, delta)>/sqrt(cmap_dim) (spec §4)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        self.cfg = cfg
        log2 = int(np.log2(cfg.img_resolution))
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        chd = {r: min(cfg.channel_base // r, cfg.channel_max) for r in self.block_resolutions + [4]}
        cmap_dim = chd[4] if cfg.cmap_dim is None else cfg.cmap_dim
        if cfg.c_dim == 0:
            cmap_dim = 0
        for r in self.block_resolutions:
            setattr(
                self,
                f"b{r}",
                DiscriminatorBlock(
                    chd[r] if r < cfg.img_resolution else 0,
                    chd[r],
                    chd[r // 2],
                    r,
                    cfg.img_channels,
                    cfg.conv_clamp,
                ),
            )
        if cfg.c_dim > 0:
            self.mapping = MappingNetwork(
                0,
                cfg.c_dim,
                cfg.index_dim,
                cmap_dim,
                None,
                embed_features=cfg.mapping_embed,
                num_layers=cfg.mapping_layers,
                w_avg_beta=None,
                track_w_avg=False,
            )
        self.b4 = DiscriminatorEpilogue(
            chd[4], cmap_dim, 4, cfg.mbstd_group, cfg.mbstd_channels, cfg.conv_clamp
        )

    def forward(self, img: torch.Tensor, c: torch.Tensor | None, index: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        if img.ndim != 4 or img.shape[1] != cfg.img_channels or img.shape[-1] != cfg.img_resolution:
            raise ValueError(
                f"D input must be [B, {cfg.img_channels}, {cfg.img_resolution}, "
                f"{cfg.img_resolution}], got {tuple(img.shape)}"
            )
        x = None
        for r in self.block_resolutions:
            x = getattr(self, f"b{r}")(x, img)
        cmap = self.mapping(None, c, index) if cfg.c_dim > 0 else None
        return self.b4(x, cmap)



def build_discriminator(cfg: DiscriminatorConfig) -> CoModDiscriminator:
    return CoModDiscriminator(cfg)

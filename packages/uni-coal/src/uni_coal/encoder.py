"""The image-conditioned encoder of the Uni-COAL generator (spec §2, "ReversedEncoder"): modulated encoder
layers mirroring the synthesis layers, skip features per size and the global code for co-modulation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import GeneratorConfig
from .layers import Conv2dLayer, FilteredLayerBase, FullyConnectedLayer, MappingNetwork, filter_setup


class EncoderLayer(FilteredLayerBase):
    """Encoder layer: (modulated) conv + lrelu without oversampling; down layers use a 12-tap fd (spec §2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_size: int,
        out_size: int,
        in_sampling_rate: float,
        out_sampling_rate: float,
        in_cutoff: float,
        out_cutoff: float,
        in_half_width: float,
        out_half_width: float,
        conv_kernel: int = 3,
        filter_size: int = 6,
        conv_clamp: float | None = 256,
        magnitude_ema_beta: float = 0.999,
        w_dim: int = 512,
        modulated: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size, self.out_size = int(in_size), int(out_size)
        self.conv_kernel, self.conv_clamp, self.modulated = conv_kernel, conv_clamp, modulated
        self.magnitude_ema_beta = magnitude_ema_beta
        if modulated:
            self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, conv_kernel, conv_kernel]))
        self.weight_gain = 1 / np.sqrt(in_channels * conv_kernel**2)
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.register_buffer("magnitude_ema", torch.ones([]))
        self._register_filters(
            filter_setup(
                self.in_size,
                self.out_size,
                in_sampling_rate,
                out_sampling_rate,
                in_cutoff,
                out_cutoff,
                in_half_width,
                out_half_width,
                conv_kernel,
                filter_size,
                1,
            )
        )

    def forward(self, x: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        # The official encoder never updates magnitude_ema (forward has no update_emas caller), gain stays 1/sqrt(ema)
        input_gain = self.magnitude_ema.rsqrt()
        if self.modulated:
            x = ops.modulated_conv2d(
                x,
                self.weight,
                self.affine(w),
                padding=self.conv_kernel - 1,
                demodulate=True,
                input_gain=input_gain,
            )
        else:
            x = torch.nn.functional.conv2d(
                x, (self.weight * self.weight_gain).to(x.dtype), padding=self.conv_kernel - 1
            )
        return ops.filtered_lrelu(
            x,
            self.up_filter,
            self.down_filter,
            self.bias.to(x.dtype),
            up=self.up_factor,
            down=self.down_factor,
            padding=self.padding,
            gain=np.sqrt(2),
            slope=0.2,
            clamp=self.conv_clamp,
        )


class ReversedEncoder(nn.Module):
    """Image encoder mirroring synthesis layers N-1..0; returns skips, the final map and the global code g."""

    def __init__(self, cfg: GeneratorConfig, sched: dict):
        super().__init__()
        n, m = cfg.num_layers, cfg.margin_size
        self.num_layers, self.margin_size, self.modulated = n, m, cfg.enc_modulated
        es, rates, cutoffs, hws, ch = (
            sched["enc_sizes"],
            sched["rates"],
            sched["cutoffs"],
            sched["half_widths"],
            sched["channels"],
        )
        if cfg.enc_modulated:
            self.mapping = MappingNetwork(
                0,
                cfg.c_dim,
                cfg.index_dim,
                cfg.enc_w_dim,
                None,
                embed_features=cfg.enc_embed,
                num_layers=cfg.enc_mapping_layers,
                lr_multiplier=cfg.mapping_lr_mult,
                w_avg_beta=None,
            )
        # Skip bookkeeping as the official code: the last two entries get the margin added twice (Q6, harmless)
        self.sizes = [int(s) for s in es[:-2]] + [int(es[-2]) + 2 * m, int(es[-1]) + 2 * m]
        self.feature_layers: dict[int, int] = {}
        for idx in range(n):
            rev, rev_prev = n - idx - 1, n - max(idx - 1, 0) - 1
            in_ch = cfg.img_channels_in if idx == 0 else int(ch[rev_prev])
            setattr(
                self,
                f"encoder_{idx}",
                EncoderLayer(
                    in_ch,
                    int(ch[rev]),
                    int(es[rev_prev]),
                    int(es[rev]),
                    int(rates[rev_prev]),
                    int(rates[rev]),
                    cutoffs[rev_prev],
                    cutoffs[rev],
                    hws[rev_prev],
                    hws[rev],
                    conv_kernel=cfg.conv_kernel,
                    filter_size=cfg.filter_size,
                    conv_clamp=cfg.conv_clamp,
                    magnitude_ema_beta=cfg.magnitude_ema_beta,
                    w_dim=cfg.enc_w_dim,
                    modulated=cfg.enc_modulated,
                ),
            )
            if self.sizes[rev] != self.sizes[rev_prev] and self.sizes[rev_prev] != self.sizes[0]:
                self.feature_layers[idx] = self.sizes[rev]
        c0 = int(ch[0])
        self.e_16x16 = Conv2dLayer(c0, c0, kernel_size=3, activation="lrelu")
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.fc_in = FullyConnectedLayer(c0 * 16, cfg.global_dim, activation="lrelu")
        self.dropout = nn.Dropout(p=cfg.enc_dropout)
        # run.deterministic: keep_mask(g) -> {0, 1} mask of g's shape from keyed draws (issue 18)
        self.keep_mask = None

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, index: torch.Tensor | None = None):
        x = torch.nn.functional.pad(img, [self.margin_size] * 4, "constant", -1)  # -1 = background (spec §2)
        w = self.mapping(None, c, index) if self.modulated else None
        feats: dict[int, torch.Tensor] = {}
        for idx in range(self.num_layers):
            x = getattr(self, f"encoder_{idx}")(x, w)
            if idx in self.feature_layers:
                feats[self.feature_layers[idx]] = x
        g = self.fc_in(self.pool(self.e_16x16(x)).flatten(1))
        p = self.dropout.p
        if self.keep_mask is not None and self.training and p > 0:  # nn.Dropout's rule on keyed masks
            return feats, x, g * self.keep_mask(g) / (1.0 - p)
        return feats, x, self.dropout(g)

"""Uni-COAL generator (spec §2): StyleGAN3-T synthesis with co-modulation by the image encoder's global code
and the encoder's skip features (:mod:`.encoder`); building blocks in :mod:`.layers`, the discriminator in
:mod:`.discriminator`. Parameter and buffer names equal the official ones, so an official state dict loads
without renaming (``convert.py`` only casts and validates).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import GeneratorConfig
from .encoder import ReversedEncoder
from .layers import FilteredLayerBase, FullyConnectedLayer, MappingNetwork, filter_setup, layer_schedule


class SynthesisInput(nn.Module):
    """Fourier features (random frequencies in a disc, random phases), rotated/translated by ws[0]."""

    def __init__(self, w_dim: int, channels: int, size: int, sampling_rate: float, bandwidth: float):
        super().__init__()
        self.w_dim, self.channels, self.size = w_dim, channels, int(size)
        self.sampling_rate, self.bandwidth = float(sampling_rate), float(bandwidth)
        freqs = torch.randn([channels, 2])
        radii = freqs.square().sum(dim=1, keepdim=True).sqrt()
        freqs /= radii * radii.square().exp().pow(0.25)
        freqs *= bandwidth
        phases = torch.rand([channels]) - 0.5
        self.weight = nn.Parameter(torch.randn([channels, channels]))
        self.affine = FullyConnectedLayer(w_dim, 4, weight_init=0, bias_init=[1, 0, 0, 0])
        self.register_buffer("transform", torch.eye(3, 3))  # user inverse transform (equivariance tests)
        self.register_buffer("freqs", freqs)
        self.register_buffer("phases", phases)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        b = w.shape[0]
        t = self.affine(w)
        t = t / t[:, :2].norm(dim=1, keepdim=True)
        m_r = torch.eye(3, device=w.device).unsqueeze(0).repeat([b, 1, 1])
        m_r[:, 0, 0] = t[:, 0]
        m_r[:, 0, 1] = -t[:, 1]
        m_r[:, 1, 0] = t[:, 1]
        m_r[:, 1, 1] = t[:, 0]
        m_t = torch.eye(3, device=w.device).unsqueeze(0).repeat([b, 1, 1])
        m_t[:, 0, 2] = -t[:, 2]
        m_t[:, 1, 2] = -t[:, 3]
        transforms = m_r @ m_t @ self.transform.unsqueeze(0)
        phases = self.phases.unsqueeze(0) + (self.freqs.unsqueeze(0) @ transforms[:, :2, 2:]).squeeze(2)
        freqs = self.freqs.unsqueeze(0) @ transforms[:, :2, :2]
        amplitudes = (
            1 - (freqs.norm(dim=2) - self.bandwidth) / (self.sampling_rate / 2 - self.bandwidth)
        ).clamp(0, 1)
        theta = torch.eye(2, 3, device=w.device)
        theta[0, 0] = 0.5 * self.size / self.sampling_rate
        theta[1, 1] = 0.5 * self.size / self.sampling_rate
        grids = torch.nn.functional.affine_grid(
            theta.unsqueeze(0), [1, 1, self.size, self.size], align_corners=False
        )
        x = (grids.unsqueeze(3) @ freqs.permute(0, 2, 1).unsqueeze(1).unsqueeze(2)).squeeze(3)
        x = torch.sin((x + phases.unsqueeze(1).unsqueeze(2)) * (np.pi * 2))
        x = x * amplitudes.unsqueeze(1).unsqueeze(2)
        x = x @ (self.weight / np.sqrt(self.channels)).t()
        return x.permute(0, 3, 1, 2)


class SynthesisLayer(FilteredLayerBase):
    """Co-modulated conv (style = A([w ; g])) + filtered lrelu (+ encoder skip after it), spec §2."""

    def __init__(
        self,
        w_dim: int,
        global_dim: int,
        is_torgb: bool,
        is_critically_sampled: bool,
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
        lrelu_upsampling: int = 2,
        conv_clamp: float | None = 256,
        magnitude_ema_beta: float = 0.999,
        cond_mod: bool = True,
    ):
        super().__init__()
        self.w_dim, self.is_torgb, self.is_critically_sampled = w_dim, is_torgb, is_critically_sampled
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_size, self.out_size = int(in_size), int(out_size)
        self.in_sampling_rate, self.out_sampling_rate = in_sampling_rate, out_sampling_rate
        self.in_cutoff, self.out_cutoff = float(in_cutoff), float(out_cutoff)
        self.in_half_width, self.out_half_width = float(in_half_width), float(out_half_width)
        self.conv_kernel = 1 if is_torgb else conv_kernel
        self.conv_clamp, self.magnitude_ema_beta, self.cond_mod = conv_clamp, magnitude_ema_beta, cond_mod
        self.affine = FullyConnectedLayer(w_dim + (global_dim if cond_mod else 0), in_channels, bias_init=1)
        self.weight = nn.Parameter(
            torch.randn([out_channels, in_channels, self.conv_kernel, self.conv_kernel])
        )
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
                self.conv_kernel,
                filter_size,
                lrelu_upsampling,
                is_torgb,
            )
        )

    def forward(
        self,
        x: torch.Tensor,
        w: torch.Tensor,
        g: torch.Tensor | None,
        skip: torch.Tensor | None = None,
        update_emas: bool = False,
    ) -> torch.Tensor:
        if update_emas:
            cur = x.detach().to(torch.float32).square().mean()
            self.magnitude_ema.copy_(cur.lerp(self.magnitude_ema, self.magnitude_ema_beta))
        input_gain = self.magnitude_ema.rsqrt()
        if self.cond_mod:
            w = torch.cat((w, g), 1)  # co-modulation (spec §2)
        styles = self.affine(w)
        if self.is_torgb:
            styles = styles * (1 / np.sqrt(self.in_channels * self.conv_kernel**2))
        x = ops.modulated_conv2d(
            x,
            self.weight,
            styles,
            demodulate=not self.is_torgb,
            padding=self.conv_kernel - 1,
            input_gain=input_gain,
        )
        x = ops.filtered_lrelu(
            x,
            self.up_filter,
            self.down_filter,
            self.bias.to(x.dtype),
            up=self.up_factor,
            down=self.down_factor,
            padding=self.padding,
            gain=1 if self.is_torgb else np.sqrt(2),
            slope=1 if self.is_torgb else 0.2,
            clamp=self.conv_clamp,
        )
        if skip is not None:
            x = x + skip
        return x


class SynthesisNetwork(nn.Module):
    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        sched = layer_schedule(cfg)
        self.schedule = sched
        n = cfg.num_layers
        self.num_ws = n + 2
        self.w_dim, self.img_resolution = cfg.w_dim, cfg.img_resolution
        self.output_scale = cfg.output_scale
        self.sizes = [int(s) for s in sched["sizes"]]
        self.encoder = ReversedEncoder(cfg, sched)
        ch, rates, cut, hw = sched["channels"], sched["rates"], sched["cutoffs"], sched["half_widths"]
        self.input = SynthesisInput(cfg.w_dim, int(ch[0]), self.sizes[0], rates[0], cut[0])
        # Skip flags indexed by the number of size changes so far (official behaviour, Q6)
        log2 = int(np.log2(cfg.img_resolution))
        if cfg.skip_resolution >= 4:
            final = int(np.log2(cfg.skip_resolution))
            connects = [True] * (final - 1) + [False] * (log2 - final)
        else:
            connects = [False] * log2
        self.layer_names: list[str] = []
        self.skip_sizes: dict[int, int] = {}
        res_idx = 1
        for idx in range(n + 1):
            prev = max(idx - 1, 0)
            layer = SynthesisLayer(
                cfg.w_dim,
                cfg.global_dim,
                is_torgb=idx == n,
                is_critically_sampled=idx >= n - cfg.num_critical,
                in_channels=int(ch[prev]),
                out_channels=int(ch[idx]),
                in_size=self.sizes[prev],
                out_size=self.sizes[idx],
                in_sampling_rate=int(rates[prev]),
                out_sampling_rate=int(rates[idx]),
                in_cutoff=cut[prev],
                out_cutoff=cut[idx],
                in_half_width=hw[prev],
                out_half_width=hw[idx],
                conv_kernel=cfg.conv_kernel,
                filter_size=cfg.filter_size,
                lrelu_upsampling=cfg.lrelu_upsampling,
                conv_clamp=cfg.conv_clamp,
                magnitude_ema_beta=cfg.magnitude_ema_beta,
                cond_mod=cfg.cond_mod,
            )
            name = f"L{idx}_{layer.out_size}_{layer.out_channels}"
            setattr(self, name, layer)
            self.layer_names.append(name)
            nxt = min(idx + 1, n)
            if self.sizes[idx] != self.sizes[nxt] and self.sizes[idx] != self.sizes[0]:
                if res_idx < len(connects) and connects[res_idx]:
                    self.skip_sizes[idx] = self.sizes[idx]
                res_idx += 1

    def forward(
        self,
        ws: torch.Tensor,
        c: torch.Tensor | None,
        index: torch.Tensor | None,
        img_in: torch.Tensor,
        update_emas: bool = False,
        global_code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``global_code`` replaces the encoder's g (used to hold g fixed in the equivariance test, spec §8.6)."""
        ws = ws.to(torch.float32).unbind(dim=1)
        feats, e_final, g = self.encoder(img_in, c, index)
        if global_code is not None:
            g = global_code
        x = self.input(ws[0]) + e_final
        for idx, (name, w) in enumerate(zip(self.layer_names, ws[1:])):
            skip = feats[self.skip_sizes[idx]] if idx in self.skip_sizes else None
            x = getattr(self, name)(x, w, g, skip=skip, update_emas=update_emas)
        if self.output_scale != 1:
            x = x * self.output_scale
        return x.to(torch.float32)


class UniCOALGenerator(nn.Module):
    """G(z, c, delta, x) -> target slice [B, 1, R, R] (spec §2)."""

    def __init__(self, cfg: GeneratorConfig):
        super().__init__()
        self.cfg = cfg
        self.z_dim, self.c_dim, self.index_dim = cfg.z_dim, cfg.c_dim, cfg.index_dim
        self.synthesis = SynthesisNetwork(cfg)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(
            cfg.z_dim,
            cfg.c_dim,
            cfg.index_dim,
            cfg.w_dim,
            self.num_ws,
            embed_features=cfg.mapping_embed,
            num_layers=cfg.mapping_layers,
            lr_multiplier=cfg.mapping_lr_mult,
            w_avg_beta=0.998,
        )

    def forward(
        self,
        z: torch.Tensor,
        c: torch.Tensor | None,
        index: torch.Tensor | None,
        cond_img: torch.Tensor,
        update_emas: bool = False,
        global_code: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        if (
            cond_img.ndim != 4
            or cond_img.shape[1] != cfg.img_channels_in
            or cond_img.shape[2:] != (cfg.img_resolution, cfg.img_resolution)
        ):
            raise ValueError(
                f"cond_img must be [B, {cfg.img_channels_in}, {cfg.img_resolution}, "
                f"{cfg.img_resolution}], got {tuple(cond_img.shape)}"
            )
        # Q2: magnitude/w_avg EMAs only update when the fix flag is on (official: never)
        upd = update_emas and cfg.update_magnitude_ema
        ws = self.mapping(z, c, index, update_emas=upd)
        return self.synthesis(ws, c, index, cond_img, update_emas=upd, global_code=global_code)


# ----------------------------------------------------------------------------------- helpers


def layer_table(g: UniCOALGenerator) -> tuple[list[dict], list[dict]]:
    """Per-layer tables in the format of the official fixture (sizes, rates, cutoffs, taps, padding)."""
    syn = []
    s = g.synthesis
    for name in s.layer_names:
        lay = getattr(s, name)
        syn.append(
            dict(
                name=name,
                in_size=lay.in_size,
                out_size=lay.out_size,
                in_channels=lay.in_channels,
                out_channels=lay.out_channels,
                in_sampling_rate=int(lay.in_sampling_rate),
                out_sampling_rate=int(lay.out_sampling_rate),
                tmp_sampling_rate=int(lay.tmp_sampling_rate),
                in_cutoff=lay.in_cutoff,
                out_cutoff=lay.out_cutoff,
                in_half_width=lay.in_half_width,
                out_half_width=lay.out_half_width,
                up_factor=lay.up_factor,
                down_factor=lay.down_factor,
                up_taps=lay.up_taps,
                down_taps=lay.down_taps,
                padding=list(lay.padding),
                is_critically_sampled=lay.is_critically_sampled,
                is_torgb=lay.is_torgb,
            )
        )
    enc = []
    for idx in range(s.encoder.num_layers):
        lay = getattr(s.encoder, f"encoder_{idx}")
        enc.append(
            dict(
                name=f"encoder_{idx}",
                in_size=lay.in_size,
                out_size=lay.out_size,
                in_channels=lay.in_channels,
                out_channels=lay.out_channels,
                up_factor=lay.up_factor,
                down_factor=lay.down_factor,
                up_taps=lay.up_taps,
                down_taps=lay.down_taps,
                padding=list(lay.padding),
            )
        )
    return syn, enc


def build_generator(cfg: GeneratorConfig) -> UniCOALGenerator:
    return UniCOALGenerator(cfg)


def config_summary(cfg: GeneratorConfig) -> dict:
    return asdict(cfg)

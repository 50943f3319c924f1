"""Uni-COAL generator (StyleGAN3-T synthesis + image encoder + co-modulation) and CoMod discriminator.

Spec §2 (generator) and §4 (discriminator). Parameter and buffer names equal the official ones, so an
official state dict loads without renaming (``convert.py`` only casts and validates).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import DiscriminatorConfig, GeneratorConfig

# ----------------------------------------------------------------------------------- basic layers


class FullyConnectedLayer(nn.Module):
    """Equalised-LR linear layer: weight ~ N(0,1)*init/lr_mult, scaled by lr_mult/sqrt(fan_in) at run time."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str = "linear",
        bias: bool = True,
        lr_multiplier: float = 1.0,
        weight_init: float = 1.0,
        bias_init=0.0,
    ):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) * (weight_init / lr_multiplier))
        bias_init = np.broadcast_to(np.asarray(bias_init, dtype=np.float32), [out_features])
        self.bias = (
            nn.Parameter(torch.tensor(bias_init / lr_multiplier, dtype=torch.float32)) if bias else None
        )
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        b = self.bias
        if b is not None:
            b = b.to(x.dtype)
            if self.bias_gain != 1:
                b = b * self.bias_gain
        if self.activation == "linear" and b is not None:
            return torch.addmm(b.unsqueeze(0), x, w.t())
        return ops.bias_act(x.matmul(w.t()), b, act=self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
        )


class Conv2dLayer(nn.Module):
    """StyleGAN2 conv layer (equalised LR, optional [1,3,3,1] down-sampling, bias+act+clamp)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        bias: bool = True,
        activation: str = "linear",
        down: int = 1,
        conv_clamp: float | None = None,
    ):
        super().__init__()
        self.activation, self.down, self.conv_clamp = activation, down, conv_clamp
        self.register_buffer("resample_filter", ops.setup_filter([1, 3, 3, 1]))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = ops._ACTS[activation][2]
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        w = (self.weight * self.weight_gain).to(x.dtype)
        x = ops.conv2d_resample(x, w, f=self.resample_filter, down=self.down, padding=self.padding)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.bias_act(x, b, act=self.activation, gain=self.act_gain * gain, clamp=clamp)


def _normalize_2nd_moment(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(1, keepdim=True) + eps).rsqrt()


class MappingNetwork(nn.Module):
    """z (normalised) ++ FC(c) (normalised) ++ FC(delta) (normalised) -> FC+lrelu layers -> w (spec §2)."""

    def __init__(
        self,
        z_dim: int,
        c_dim: int,
        index_dim: int,
        w_dim: int,
        num_ws: int | None,
        embed_features: int | None = None,
        num_layers: int = 2,
        lr_multiplier: float = 0.01,
        w_avg_beta: float | None = 0.998,
        track_w_avg: bool = True,
    ):
        super().__init__()
        self.z_dim, self.c_dim, self.index_dim, self.w_dim = z_dim, c_dim, index_dim, w_dim
        self.num_ws, self.num_layers, self.w_avg_beta = num_ws, num_layers, w_avg_beta
        embed = z_dim if embed_features is None else embed_features
        self.embed = FullyConnectedLayer(c_dim, embed) if c_dim > 0 else None
        # posi_emb='linear': delta is fed raw to its embedding FC (spec §1)
        self.embed_index = FullyConnectedLayer(index_dim, embed) if index_dim > 0 else None
        features = [z_dim + (embed if c_dim > 0 else 0) + (embed if index_dim > 0 else 0)] + [
            w_dim
        ] * num_layers
        for i in range(num_layers):
            setattr(
                self,
                f"fc{i}",
                FullyConnectedLayer(
                    features[i], features[i + 1], activation="lrelu", lr_multiplier=lr_multiplier
                ),
            )
        if track_w_avg:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: torch.Tensor | None,
        c: torch.Tensor | None,
        index: torch.Tensor | None,
        truncation_psi: float = 1.0,
        update_emas: bool = False,
    ) -> torch.Tensor:
        parts = []
        if self.z_dim > 0:
            parts.append(_normalize_2nd_moment(z.to(torch.float32)))
        if self.c_dim > 0:
            parts.append(_normalize_2nd_moment(self.embed(c.to(torch.float32))))
        if self.index_dim > 0:
            parts.append(_normalize_2nd_moment(self.embed_index(index.to(torch.float32))))
        x = torch.cat(parts, dim=1)
        for i in range(self.num_layers):
            x = getattr(self, f"fc{i}")(x)
        if update_emas and self.w_avg_beta is not None and hasattr(self, "w_avg"):
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            x = self.w_avg.lerp(x, truncation_psi)
        return x


# ----------------------------------------------------------------------------------- layer schedule


def layer_schedule(cfg: GeneratorConfig) -> dict:
    """Cutoffs, stopbands, rates, half-widths, channels and sizes of spec §2 (StyleGAN3-T)."""
    n, r = cfg.num_layers, cfg.img_resolution
    last_cutoff = r / 2
    last_stopband = last_cutoff * cfg.last_stopband_rel
    exponents = np.minimum(np.arange(n + 1) / (n - cfg.num_critical), 1)
    cutoffs = cfg.first_cutoff * (last_cutoff / cfg.first_cutoff) ** exponents
    stopbands = cfg.first_stopband * (last_stopband / cfg.first_stopband) ** exponents
    rates = np.exp2(np.ceil(np.log2(np.minimum(stopbands * 2, r))))
    half_widths = np.maximum(stopbands, rates / 2) - cutoffs
    sizes = rates + cfg.margin_size * 2
    enc_sizes = sizes.copy()
    sizes[-2:] = r
    channels = np.rint(np.minimum((cfg.channel_base / 2) / cutoffs, cfg.channel_max))
    channels[-1] = cfg.img_channels_out
    return dict(
        cutoffs=cutoffs,
        stopbands=stopbands,
        rates=rates,
        half_widths=half_widths,
        sizes=sizes,
        enc_sizes=enc_sizes,
        channels=channels,
    )


def _filter_setup(
    in_size,
    out_size,
    in_rate,
    out_rate,
    in_cutoff,
    out_cutoff,
    in_hw,
    out_hw,
    kernel,
    filter_size,
    lrelu_up,
    is_torgb=False,
):
    tmp_rate = max(in_rate, out_rate) * (1 if is_torgb else lrelu_up)
    up = int(np.rint(tmp_rate / in_rate))
    down = int(np.rint(tmp_rate / out_rate))
    if in_rate * up != tmp_rate or out_rate * down != tmp_rate:
        raise ValueError("sampling rates are not integer multiples of each other")
    up_taps = filter_size * up if up > 1 and not is_torgb else 1
    down_taps = filter_size * down if down > 1 and not is_torgb else 1
    fu = ops.design_lowpass_filter(up_taps, in_cutoff, in_hw * 2, tmp_rate)
    fd = ops.design_lowpass_filter(down_taps, out_cutoff, out_hw * 2, tmp_rate)
    # padding of the symmetric interpretation (StyleGAN3 appendix C.3)
    pad_total = (out_size - 1) * down + 1 - (in_size + kernel - 1) * up + up_taps + down_taps - 2
    pad_lo = (pad_total + up) // 2
    pad_hi = pad_total - pad_lo
    return dict(
        tmp_rate=tmp_rate,
        up=up,
        down=down,
        up_taps=up_taps,
        down_taps=down_taps,
        fu=fu,
        fd=fd,
        padding=[int(pad_lo), int(pad_hi), int(pad_lo), int(pad_hi)],
    )


class _FilteredLayerBase(nn.Module):
    def _register_filters(self, setup: dict) -> None:
        self.tmp_sampling_rate = setup["tmp_rate"]
        self.up_factor, self.down_factor = setup["up"], setup["down"]
        self.up_taps, self.down_taps = setup["up_taps"], setup["down_taps"]
        self.padding = setup["padding"]
        self.register_buffer("up_filter", setup["fu"])
        self.register_buffer("down_filter", setup["fd"])


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


class SynthesisLayer(_FilteredLayerBase):
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
            _filter_setup(
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


class EncoderLayer(_FilteredLayerBase):
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
            _filter_setup(
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

    def forward(self, img: torch.Tensor, c: torch.Tensor | None = None, index: torch.Tensor | None = None):
        x = torch.nn.functional.pad(img, [self.margin_size] * 4, "constant", -1)  # -1 = background (spec §2)
        w = self.mapping(None, c, index) if self.modulated else None
        feats: dict[int, torch.Tensor] = {}
        for idx in range(self.num_layers):
            x = getattr(self, f"encoder_{idx}")(x, w)
            if idx in self.feature_layers:
                feats[self.feature_layers[idx]] = x
        g = self.fc_in(self.pool(self.e_16x16(x)).flatten(1))
        return feats, x, self.dropout(g)


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


def build_discriminator(cfg: DiscriminatorConfig) -> CoModDiscriminator:
    return CoModDiscriminator(cfg)


def config_summary(cfg: GeneratorConfig) -> dict:
    return asdict(cfg)

"""Building blocks of the Uni-COAL networks (spec §2): equalised-lr fully connected and conv layers, the
mapping network, and the alias-free layer machinery (StyleGAN3-T schedule of cutoffs/rates/sizes, filter setup)
shared by the synthesis and encoder layers. Parameter names equal the official ones."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .config import GeneratorConfig

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


def filter_setup(
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


class FilteredLayerBase(nn.Module):
    def _register_filters(self, setup: dict) -> None:
        self.tmp_sampling_rate = setup["tmp_rate"]
        self.up_factor, self.down_factor = setup["up"], setup["down"]
        self.up_taps, self.down_taps = setup["up_taps"], setup["down_taps"]
        self.padding = setup["padding"]
        self.register_buffer("up_filter", setup["fu"])
        self.register_buffer("down_filter", setup["fd"])



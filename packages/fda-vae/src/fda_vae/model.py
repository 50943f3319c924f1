"""FDA-VAE generator (shared encoder, latent mean flip, two phase decoders) and its PatchGAN critics.

Built on MONAI core's ``autoencoderkl.Encoder``/``Decoder`` as spec §2 recommends:
``include_fc=False`` (the official attention never applies ``proj_attn``, spec §6.1), SDPA attention
(``use_flash_attention=True`` replaces xformers, spec §6.2), and every decoder up-sampler replaced by
the official kernel-3 transposed convolution (stride 2, padding 1, output padding 1).

Phase naming (spec §1): phase ``a`` is the official ``mr`` / phase_1 (source, e.g. portal venous) and
uses ``decoder_a`` + ``post_quant_conv_a`` (official ``decoder_2`` / ``post_quant_conv_2``); phase
``b`` is the official ``ct`` / phase_2 (target, e.g. delay) and uses ``decoder_b`` +
``post_quant_conv_b`` (official ``decoder`` / ``post_quant_conv``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.networks.blocks import Convolution
from monai.networks.blocks.spatialattention import SpatialAttentionBlock
from monai.networks.blocks.upsample import UpSample
from monai.networks.nets import PatchDiscriminator
from monai.networks.nets.autoencoderkl import Decoder, Encoder
from torch import nn

PHASES = ("a", "b")
LOGVAR_CLAMP = (-30.0, 20.0)  # spec §2 (Yshape:781-784)


def other(phase: str) -> str:
    check_phase(phase)
    return "b" if phase == "a" else "a"


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(
            f"phase must be 'a' (phase_1, official 'mr') or 'b' (phase_2, official 'ct'), got {phase!r}"
        )
    return phase


@dataclass
class GeneratorOutput:
    """Named outputs of :meth:`FDAVAE.forward` (spec §6.13 fix: no fixed positional order)."""

    own: torch.Tensor  # reconstruction of the input's own phase
    cross: torch.Tensor  # synthesis of the other phase from the flipped posterior
    mu: torch.Tensor
    sigma: torch.Tensor
    logvar: torch.Tensor
    src: str

    def image(self, phase: str) -> torch.Tensor:
        """The output in ``phase`` (official order: ``reconstruction_ct`` is phase ``b``)."""
        return self.own if check_phase(phase) == self.src else self.cross


def _conv1x1(spatial_dims: int, channels: int) -> Convolution:
    return Convolution(
        spatial_dims=spatial_dims,
        in_channels=channels,
        out_channels=channels,
        strides=1,
        kernel_size=1,
        padding=0,
        conv_only=True,
    )


def _transposed_upsampler(spatial_dims: int, channels: int) -> nn.Module:
    conv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
    # spec §2: ConvTranspose(C->C, k3, s2, p1, output_padding 1), not MONAI's kernel-2 deconv
    return conv(channels, channels, kernel_size=3, stride=2, padding=1, output_padding=1)


class PhaseDecoder(Decoder):
    """MONAI ``Decoder`` with k3 transposed-conv up-sampling and a tanh output (Yshape:617)."""

    def __init__(
        self,
        spatial_dims: int,
        channels: Sequence[int],
        latent_channels: int,
        out_channels: int,
        num_res_blocks: Sequence[int],
        norm_num_groups: int,
        norm_eps: float,
        attention_levels: Sequence[bool],
        with_nonlocal_attn: bool,
        use_flash_attention: bool,
    ):
        super().__init__(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=latent_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_nonlocal_attn,
            use_convtranspose=False,
            include_fc=False,
            use_combined_linear=False,
            use_flash_attention=use_flash_attention,
        )
        for i, block in enumerate(self.blocks):
            if isinstance(block, UpSample):
                self.blocks[i] = _transposed_upsampler(spatial_dims, block_channels(block))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(super().forward(z))


def block_channels(block: nn.Module) -> int:
    """Channel count of a MONAI up-sampling block (its post-conv's input channels)."""
    for m in block.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            return int(m.in_channels)
    raise ValueError("up-sampling block without a convolution")


class FDAVAE(nn.Module):
    """Y-shaped VAE: ``encode`` → N(μ, σ²); own phase decodes N(μ, σ²), the other phase N(−μ, σ²)."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: int | Sequence[int] = 2,
        latent_channels: int = 16,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        attention_levels: Sequence[bool] | None = None,
        with_encoder_nonlocal_attn: bool = True,
        with_decoder_nonlocal_attn: bool = True,
        use_flash_attention: bool = True,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if isinstance(num_res_blocks, int):
            num_res_blocks = (num_res_blocks,) * len(channels)
        num_res_blocks = tuple(int(n) for n in num_res_blocks)
        attention_levels = (
            tuple(attention_levels) if attention_levels is not None else (False,) * len(channels)
        )
        if len(num_res_blocks) != len(channels) or len(attention_levels) != len(channels):
            raise ValueError("num_res_blocks and attention_levels must have one entry per level of channels")
        if any(c % norm_num_groups for c in channels):
            raise ValueError(
                f"every entry of channels {channels} must be divisible by norm_num_groups={norm_num_groups}"
            )
        self.spatial_dims = spatial_dims
        self.latent_channels = latent_channels
        self.downsample = 2 ** (len(channels) - 1)
        self.encoder = Encoder(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            channels=channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_encoder_nonlocal_attn,
            include_fc=False,
            use_combined_linear=False,
            use_flash_attention=use_flash_attention,
        )
        self.quant_conv_mu = _conv1x1(spatial_dims, latent_channels)
        self.quant_conv_log_sigma = _conv1x1(spatial_dims, latent_channels)
        kw = dict(
            spatial_dims=spatial_dims,
            channels=channels,
            latent_channels=latent_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            attention_levels=attention_levels,
            with_nonlocal_attn=with_decoder_nonlocal_attn,
            use_flash_attention=use_flash_attention,
        )
        self.post_quant_conv_a = _conv1x1(spatial_dims, latent_channels)
        self.post_quant_conv_b = _conv1x1(spatial_dims, latent_channels)
        self.decoder_a = PhaseDecoder(**kw)
        self.decoder_b = PhaseDecoder(**kw)

    # ------------------------------------------------------------------------------------ latent
    def encode_logvar(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, clamped log σ²)."""
        h = self.encoder(x)
        mu = self.quant_conv_mu(h)
        logvar = torch.clamp(self.quant_conv_log_sigma(h), *LOGVAR_CLAMP)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) with σ = exp(½·clamp(log σ², −30, 20)) (spec §2)."""
        mu, logvar = self.encode_logvar(x)
        return mu, torch.exp(0.5 * logvar)

    @staticmethod
    def flip(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flip(μ, σ) = (−μ, σ): an involution that leaves σ untouched (Yshape:799-800)."""
        return -mu, sigma

    @staticmethod
    def sample(
        mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = μ + σ·ε. Without a generator ε comes from ``randn_like`` (the official draw)."""
        if generator is None:
            eps = torch.randn_like(sigma)
        else:
            eps = torch.randn(sigma.shape, generator=generator, device=generator.device, dtype=sigma.dtype)
            eps = eps.to(sigma.device)
        return mu + sigma * eps

    def decode(self, z: torch.Tensor, phase: str) -> torch.Tensor:
        """Decode a latent into ``phase`` (post-quant 1×1 conv, decoder, tanh)."""
        if check_phase(phase) == "a":
            return self.decoder_a(self.post_quant_conv_a(z))
        return self.decoder_b(self.post_quant_conv_b(z))

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        src: str,
        sample: bool = True,
        generator: torch.Generator | None = None,
        noise: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> GeneratorOutput:
        """Training forward (Yshape:890-914): own branch z = μ+σε, cross branch z' = −μ+σε' with
        independent noise drawn after the own branch's. ``sample=False`` decodes μ and −μ
        (the official ``val_reconstruct``). ``noise(k, sigma)`` (k = 0 own, 1 cross), when given, supplies
        ε instead of the generators (``run.deterministic``)."""
        check_phase(src)
        mu, logvar = self.encode_logvar(x)
        sigma = torch.exp(0.5 * logvar)
        f_mu, f_sigma = self.flip(mu, sigma)
        if sample and noise is not None:
            z_own, z_cross = mu + sigma * noise(0, sigma), f_mu + f_sigma * noise(1, f_sigma)
        elif sample:
            z_own = self.sample(mu, sigma, generator)
            z_cross = self.sample(f_mu, f_sigma, generator)
        else:
            z_own, z_cross = mu, f_mu
        own = self.decode(z_own, src)
        cross = self.decode(z_cross, other(src))
        return GeneratorOutput(own=own, cross=cross, mu=mu, sigma=sigma, logvar=logvar, src=src)

    @torch.no_grad()
    def translate(
        self, x: torch.Tensor, src: str, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Synthesize the other phase: decode −μ (default) or −μ + σ·ε (``sample=True``)."""
        mu, sigma = self.encode(x)
        f_mu, f_sigma = self.flip(mu, sigma)
        z = self.sample(f_mu, f_sigma, generator) if sample else f_mu
        return self.decode(z, other(src))

    def attention_prefixes(self) -> list[str]:
        return [n for n, m in self.named_modules() if isinstance(m, SpatialAttentionBlock)]

    def upsampler_prefixes(self) -> list[str]:
        return [n for n, m in self.named_modules() if isinstance(m, nn.ConvTranspose2d | nn.ConvTranspose3d)]


def build_discriminator(
    spatial_dims: int = 2,
    num_layers_d: int = 3,
    channels: int = 32,
    in_channels: int = 1,
    out_channels: int = 1,
    norm: str = "INSTANCE",
) -> PatchDiscriminator:
    """MONAI ``PatchDiscriminator`` (spec §3): kernel 4, LeakyReLU 0.2, returns every activation."""
    return PatchDiscriminator(
        spatial_dims=spatial_dims,
        num_layers_d=num_layers_d,
        channels=channels,
        in_channels=in_channels,
        out_channels=out_channels,
        norm=norm,
    )


def build_generator(cfg) -> FDAVAE:
    """Generator from a :class:`fda_vae.config.ModelConfig`."""
    return FDAVAE(**cfg.kwargs())


def build_discriminators(model_cfg, disc_cfg) -> dict[str, PatchDiscriminator]:
    """One critic per phase: ``a`` judges B→A against real A, ``b`` judges A→B against real B."""
    return {
        p: build_discriminator(
            spatial_dims=model_cfg.spatial_dims,
            num_layers_d=disc_cfg.num_layers_d,
            channels=disc_cfg.channels,
            in_channels=model_cfg.out_channels,
            out_channels=1,
            norm=disc_cfg.norm,
        )
        for p in PHASES
    }

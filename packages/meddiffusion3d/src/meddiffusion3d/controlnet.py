"""ControlNet for BiFlowNet (spec §4; the authors' design recovered from the compiled ``cldm`` module).

* :class:`ControlNet` — a trainable copy of the BiFlowNet encoder side (stem and patch-embed taking
  ``cat(x_t, hint)``, time/class/resolution MLPs, the input DiT stages fused into its own levels 0/1, all down
  levels and the mid block) with six zero 1×1×1 convolutions: one per level (after the level's second
  ResBlock+attention, before its Down) and one on the mid output.
* :class:`ControlledBiFlowNet` — the frozen base (eval mode, no gradients) plus the ControlNet: the mid output gets
  control 6 and, in every up-stage, the first skip popped gets that level's control (spec §4, "Wiring").

``variant="v1"`` (default, ``cldm``): the hint is the degraded image encoded by the frozen autoencoder and
normalised like the training latents (C_hint = latent channels). ``variant="v2"`` (``cldm_new``): a CNN-only clone
without DiT stages; the hint is the degraded image downsampled to the latent grid by nearest interpolation
(:func:`image_hint`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .biflownet import BiFlowNet

__all__ = ["ControlNet", "ControlledBiFlowNet", "image_hint", "make_hint"]


def image_hint(image: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
    """v2 hint: the degraded image (B, C, D, H, W) resized to the latent grid with nearest interpolation."""
    if image.ndim != 5:
        raise ValueError(f"image hint must be (B, C, D, H, W), got {tuple(image.shape)}")
    return F.interpolate(image, size=tuple(int(s) for s in latent_shape), mode="nearest")


def make_hint(
    degraded: torch.Tensor,
    variant: str,
    latent_shape: Sequence[int],
    encode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Hint for a degraded image (B, C, D, H, W) (spec §4): v1 → ``encode_fn(degraded)``, which must be the frozen
    autoencoder's patch encoding normalised exactly like the training latents; v2 → :func:`image_hint`."""
    if variant == "v2":
        return image_hint(degraded, latent_shape)
    if variant != "v1":
        raise ValueError(f"ControlNet variant must be 'v1' or 'v2', got {variant!r}")
    if encode_fn is None:
        raise ValueError(
            "the v1 ControlNet hint needs encode_fn (the frozen autoencoder + latent normalisation)"
        )
    hint = encode_fn(degraded)
    if tuple(hint.shape[2:]) != tuple(int(s) for s in latent_shape):
        raise ValueError(
            f"encoded hint has grid {tuple(hint.shape[2:])}, expected the latent grid {latent_shape}"
        )
    return hint


class ControlNet(BiFlowNet):
    """Trainable encoder copy with zero convolutions (spec §4). Build it with :meth:`from_base` to copy weights.

    ``forward(x_t, t, hint, y=None, res=None)`` returns 6 controls: per level (dim_out @ level resolution) and the
    mid output. ``hint`` has ``hint_channels`` channels on the latent grid of ``x_t``.
    """

    def __init__(self, base_config: dict[str, Any], hint_channels: int = 8, variant: str = "v1"):
        if variant not in ("v1", "v2"):
            raise ValueError(
                f"ControlNet variant must be 'v1' (latent hint, with DiT) or 'v2' (CNN only), got {variant!r}"
            )
        if hint_channels < 1:
            raise ValueError(f"hint_channels must be >= 1, got {hint_channels}")
        cfg = dict(base_config)
        self.latent_channels = int(cfg["channels"])
        cfg["channels"] = self.latent_channels + int(hint_channels)
        super().__init__(**cfg)
        self.base_config = dict(base_config)
        self.hint_channels = int(hint_channels)
        self.variant = variant
        self.use_dit = variant == "v1"
        # decoder side is not cloned
        del self.ups, self.head_res, self.head_out, self.dit_mid, self.dit_out
        if not self.use_dit:
            del self.dit_in, self.patch_embed, self.pos_embed
        self.zero_convs = nn.ModuleList(nn.Conv3d(c, c, 1) for c in self.level_channels)
        self.mid_zero_conv = nn.Conv3d(self.level_channels[-1], self.level_channels[-1], 1)
        self.zero_controls()

    def zero_controls(self) -> None:
        for conv in [*self.zero_convs, self.mid_zero_conv]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    @classmethod
    def from_base(cls, base: BiFlowNet, hint_channels: int | None = None, variant: str = "v1") -> ControlNet:
        """Clone ``base``: every shared tensor copied; the hint input-channel slices of the stem and patch-embed
        are zero; the zero convs stay zero (spec §4, "Init"), so the controls are exactly 0 at init."""
        hint_channels = base.channels if hint_channels is None else hint_channels
        net = cls(base.config, hint_channels, variant)
        p0 = next(base.parameters())
        net.to(device=p0.device, dtype=p0.dtype)
        base_sd = base.state_dict()
        with torch.no_grad():
            for name, p in net.state_dict(keep_vars=True).items():
                if name not in base_sd:
                    continue
                src = base_sd[name]
                if name in ("stem.weight", "patch_embed.weight"):
                    p.zero_()
                    p[:, : base.channels].copy_(src)
                else:
                    p.copy_(src)
        return net

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        hint: torch.Tensor,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:  # type: ignore[override]
        if hint is None:
            raise ValueError("ControlNet needs a hint")
        if (
            hint.ndim != 5
            or hint.shape[1] != self.hint_channels
            or hint.shape[2:] != x.shape[2:]
            or hint.shape[0] != x.shape[0]
        ):
            raise ValueError(
                f"hint must be (B={x.shape[0]}, {self.hint_channels}, {tuple(x.shape[2:])}) on the "
                f"latent grid, got {tuple(hint.shape)}"
            )
        xin = torch.cat((x, hint.to(x.dtype)), dim=1)
        self.check_input(xin)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        c = self.condition(t, y, res)
        f_in = self.intra_patch_flow(xin, c, inputs_only=True)[0] if self.use_dit else []
        h = self.stem(xin)
        outs: list[torch.Tensor] = []
        for ind, lvl in enumerate(self.downs):
            if ind < len(f_in):
                h = h + f_in[ind]
            h = lvl.attn2(lvl.res2(lvl.attn1(lvl.res1(h, c)), c))
            outs.append(self.zero_convs[ind](h))
            if lvl.resample is not None:
                h = lvl.resample(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, c)), c)
        outs.append(self.mid_zero_conv(h))
        return outs


class ControlledBiFlowNet(nn.Module):
    """Frozen base BiFlowNet + trainable ControlNet; ``forward(x, t, y=, res=, hint=)`` like the base (spec §4).

    The base stays in eval mode with ``requires_grad=False`` whatever ``train()`` is called with; only
    ``self.controlnet`` is meant to be optimised (:meth:`trainable_parameters`). ``control_scales``: one per level
    and one for the mid block (6 at the paper size), default 1.
    """

    def __init__(
        self,
        base: BiFlowNet,
        controlnet: ControlNet | None = None,
        control_scales: Sequence[float] | None = None,
        variant: str = "v1",
        hint_channels: int | None = None,
    ):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False).eval()
        self.controlnet = (
            controlnet if controlnet is not None else ControlNet.from_base(base, hint_channels, variant)
        )
        n = len(self.controlnet.level_channels) + 1
        scales = [1.0] * n if control_scales is None else list(control_scales)
        if len(scales) == 1:
            scales = scales * n
        if len(scales) != n:
            raise ValueError(
                f"control_scales needs {n} values (one per level and the mid block), got {scales}"
            )
        self.control_scales = [float(s) for s in scales]

    def train(self, mode: bool = True) -> ControlledBiFlowNet:
        super().train(mode)
        self.base.eval()  # frozen base: always eval (spec §4)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.controlnet.parameters() if p.requires_grad]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        res: torch.Tensor | None = None,
        hint: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hint is None:
            raise ValueError("ControlledBiFlowNet needs hint= (the encoded degraded input)")
        controls = self.controlnet(x, t, hint, y=y, res=res)
        return self.base(x, t, y=y, res=res, controls=controls, control_scales=self.control_scales)

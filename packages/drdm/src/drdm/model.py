"""RecResACNet, the recovery network of DRDM (spec section 5), key-for-key the official state dict."""

from __future__ import annotations

import torch
from torch import nn

from .deform import compose, warp


def sinusoid_table(n_steps: int, dim: int) -> torch.Tensor:
    """Row t: columns 2k = sin(t w_k), 2k+1 = cos(t w_k), w_k = 10000^(-4k/dim) (spec section 5, quirk Q8)."""
    freqs = torch.tensor([1 / 10_000 ** (2 * (2 * k) / dim) for k in range((dim + 1) // 2)]).reshape(1, -1)
    steps = torch.arange(n_steps).reshape(n_steps, 1)
    table = torch.zeros(n_steps, dim)
    table[:, ::2] = torch.sin(steps * freqs)
    table[:, 1::2] = torch.cos(steps * freqs[:, : dim // 2])
    return table


class AtrousBlock(nn.Module):
    """``y = IN(conv0(x))``; ``z = conv_d3(act(conv_d1(act(y))))``; ``act(z + y)`` (spec section 5)."""

    def __init__(self, in_c: int, out_c: int, ndims: int = 2, normalize: bool = True, rates=(1, 3)):
        super().__init__()
        conv = getattr(nn, f"Conv{ndims}d")
        self.ln = getattr(nn, f"InstanceNorm{ndims}d")(out_c, affine=True) if normalize else nn.Identity()
        self.conv0 = conv(in_c, out_c, 3, 1, 1)
        self.convs = nn.ModuleList([conv(out_c, out_c, 3, 1, r, dilation=r) for r in rates])
        self.act = nn.LeakyReLU(1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln(self.conv0(x))
        z = y
        for conv in self.convs:
            z = conv(self.act(z))
        return self.act(z + y)


def _time_mlp(dim_in: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_out), nn.ReLU(), nn.Linear(dim_out, dim_out))


def _stage(chans: list[int], ndims: int, normalize: bool) -> nn.Sequential:
    return nn.Sequential(*[AtrousBlock(i, o, ndims, normalize) for i, o in zip(chans[:-1], chans[1:])])


class RecResACNet(nn.Module):
    """3-level U-Net of atrous residual blocks with recursive refinement (spec section 5).

    ``forward(x, t, rec_num=2)`` returns a DDF ``[B, nd, *S]`` in fractions of the image side S.
    """

    def __init__(self, n_steps: int = 80, time_emb_dim: int = 100, ndims: int = 2, num_input_chn: int = 1):
        super().__init__()
        if ndims not in (2, 3):
            raise ValueError(f"ndims must be 2 or 3, got {ndims}")
        self.ndims = ndims
        self.n_steps = n_steps
        self.num_input_chn = num_input_chn
        conv = getattr(nn, f"Conv{ndims}d")
        convt = getattr(nn, f"ConvTranspose{ndims}d")
        self.time_embed = nn.Embedding(n_steps, time_emb_dim)
        self.time_embed.weight.data = sinusoid_table(n_steps, time_emb_dim)
        self.time_embed.requires_grad_(False)
        e = time_emb_dim
        # module order = official state-dict order (spec section 6)
        self.te1 = _time_mlp(e, num_input_chn)
        self.b1 = _stage([num_input_chn, 10, 10, 10], ndims, True)
        self.down1 = conv(10, 10, 4, 2, 1)
        self.te2 = _time_mlp(e, 10)
        self.b2 = _stage([10, 20, 20, 20], ndims, True)
        self.down2 = conv(20, 20, 4, 2, 1)
        self.te3 = _time_mlp(e, 20)
        self.b3 = _stage([20, 40, 40, 40], ndims, True)
        self.down3 = conv(40, 40, 4, 2, 1)
        self.te_mid = _time_mlp(e, 40)
        self.b_mid = _stage([40, 20, 20, 40], ndims, True)
        self.up1 = convt(40, 40, 4, 2, 1)
        self.te4 = _time_mlp(e, 80)
        self.b4 = _stage([80, 40, 20, 20], ndims, False)
        self.up2 = convt(20, 20, 4, 2, 1)
        self.te5 = _time_mlp(e, 40)
        self.b5 = _stage([40, 20, 10, 10], ndims, False)
        self.up3 = convt(10, 10, 4, 2, 1)
        self.te_out = _time_mlp(e, 20)
        self.b_out = _stage([20, 10, 10, 10], ndims, False)
        self.conv_out = conv(10, ndims, 3, 1, 1)

    def unet(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One U-Net pass (spec section 5); the bottleneck conditioning is multiplicative (Q8)."""
        shape = [x.shape[0], -1] + [1] * self.ndims

        def te(mlp: nn.Module) -> torch.Tensor:
            return mlp(emb).reshape(shape)

        h1 = self.b1(x + te(self.te1))
        h2 = self.b2(self.down1(h1) + te(self.te2))
        h3 = self.b3(self.down2(h2) + te(self.te3))
        m = self.b_mid(self.down3(h3) * te(self.te_mid))
        h4 = self.b4(torch.cat((h3, self.up1(m)), 1) + te(self.te4))
        h5 = self.b5(torch.cat((h2, self.up2(h4)), 1) + te(self.te5))
        h6 = self.b_out(torch.cat((h1, self.up3(h5)), 1) + te(self.te_out))
        return self.conv_out(h6)

    def forward(self, x: torch.Tensor, t: torch.Tensor, rec_num: int = 2) -> torch.Tensor:
        if x.ndim != self.ndims + 2 or x.shape[1] != self.num_input_chn:
            raise ValueError(
                f"RecResACNet({self.ndims}D) expects [B, {self.num_input_chn}, *S], got {tuple(x.shape)}"
            )
        size = x.shape[2]
        if any(int(s) != size for s in x.shape[2:]) or size % 8:
            raise ValueError(
                f"RecResACNet needs square/cubic inputs with a side divisible by 8, got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        emb = self.time_embed(t.long())
        img = x
        ddf = x.new_zeros(())
        for r in range(rec_num):
            out = self.unet(img, emb)
            # official boundary limit (l.191): clamp S*d to ±(S-1), then divide by S again
            one = torch.clamp(out * size, min=1.0 - size, max=size - 1.0) / size
            ddf = one if r == 0 else compose(ddf, one, padding_mode="border")
            if r + 1 < rec_num:
                img = warp(x, ddf, mode="bilinear", padding_mode="zeros")
        return ddf

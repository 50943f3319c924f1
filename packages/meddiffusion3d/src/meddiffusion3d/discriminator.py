"""3D PatchGAN discriminator (pix2pixHD style; spec §1.3, official ``NLayerDiscriminator3D``)."""

from __future__ import annotations

import math

import torch
from torch import nn


class NLayerDiscriminator3D(nn.Module):
    """k4, padding 2, LeakyReLU 0.2, BatchNorm3d; blocks ``model0 … model{n_layers+1}``.

    ``forward`` returns ``(logits, outputs)`` where ``outputs`` lists every block's output, the last
    one being the logits (the official convention; feature matching uses all but the last).
    """

    def __init__(self, input_nc: int = 1, ndf: int = 32, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        self.n_layers = n_layers
        kw, padw = 4, int(math.ceil((4 - 1.0) / 2))
        norm_layer = {"batch": nn.BatchNorm3d, "sync_batch": nn.SyncBatchNorm}[norm]
        seq: list[list[nn.Module]] = [
            [nn.Conv3d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        ]
        nf = ndf
        for _ in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, 512)
            seq.append(
                [nn.Conv3d(nf_prev, nf, kw, stride=2, padding=padw), norm_layer(nf), nn.LeakyReLU(0.2, True)]
            )
        nf_prev, nf = nf, min(nf * 2, 512)
        seq.append(
            [nn.Conv3d(nf_prev, nf, kw, stride=1, padding=padw), norm_layer(nf), nn.LeakyReLU(0.2, True)]
        )
        seq.append([nn.Conv3d(nf, 1, kw, stride=1, padding=padw)])
        for i, layers in enumerate(seq):
            setattr(self, f"model{i}", nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs = []
        h = x
        for i in range(self.n_layers + 2):
            h = getattr(self, f"model{i}")(h)
            outs.append(h)
        return h, outs


class DiscriminatorPair(nn.Module):
    """D(real) and D(fake) in one ``forward`` (two separate passes, so BatchNorm statistics are those of
    the official code), so that DDP sees one forward per backward in the discriminator step."""

    def __init__(self, disc: NLayerDiscriminator3D):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.disc(real)[0], self.disc(fake)[0]

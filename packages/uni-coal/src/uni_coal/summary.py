"""``summary``: parameter counts of every network (built on the meta device, so the paper size is cheap)."""

from __future__ import annotations

from typing import Any

import torch

from .config import Config
from .discriminator import CoModDiscriminator
from .model import UniCOALGenerator


def _count(m: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in m.parameters()),
        "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
    }


def summary(cfg: Config) -> dict[str, Any]:
    from .sam import _vit

    with torch.device("meta"):
        g = UniCOALGenerator(cfg.generator)
        d = CoModDiscriminator(cfg.discriminator)
        sam = _vit(cfg.sam)
    gc, dc = cfg.generator, cfg.discriminator
    enc = g.synthesis.encoder
    parts = {
        "mapping": _count(g.mapping)["total"],
        "synthesis.input": _count(g.synthesis.input)["total"],
        "synthesis.layers": sum(_count(getattr(g.synthesis, n))["total"] for n in g.synthesis.layer_names),
        "synthesis.encoder": _count(enc)["total"],
        "synthesis.encoder.layers": sum(
            _count(getattr(enc, f"encoder_{i}"))["total"] for i in range(enc.num_layers)
        ),
    }
    sam_counts = _count(sam)
    sam_counts["trainable"] = 0  # frozen
    b, r = 16 if cfg.train.batch_size is None else cfg.train.batch_size, gc.img_resolution
    return {
        "generator": {**_count(g), "breakdown": parts},
        "discriminator": _count(d),
        "sam_image_encoder": {**sam_counts, "random_stand_in": cfg.sam.checkpoint is None},
        "shapes": {
            "G": {
                "z": [b, gc.z_dim],
                "c": [b, gc.c_dim],
                "delta": [b, gc.index_dim],
                "x": [b, gc.img_channels_in, r, r],
                "out": [b, gc.img_channels_out, r, r],
            },
            "encoder_features": {
                str(s): [b, int(getattr(enc, f"encoder_{i}").out_channels), s, s]
                for i, s in enc.feature_layers.items()
            },
            "global_code": [b, gc.global_dim],
            "D": {"in": [b, dc.img_channels, dc.img_resolution, dc.img_resolution], "out": [b, 1]},
        },
    }

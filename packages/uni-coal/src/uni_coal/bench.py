"""Benchmarks for tools/bench.py: train step (D + R1 + G + SAM) and G forward, demo and paper sizes."""

from __future__ import annotations

import torch

from medsynth_core import bench as B
from medsynth_core.bench import BenchCase
from medsynth_core.config import bundled_configs, load_config

from .config import Config

CONFIGS = bundled_configs(__file__)


def _cfg(name: str, sam: bool = False) -> Config:
    """The config of a case. ``paper`` runs at batch 2 on CPU; without ``sam`` the SAM term is dropped (no SAM
    weights in the bench environment), with ``sam`` it is on at the paper weight, computed by a
    random-initialised ViT-B image encoder (the paper's per-step cost; the 2-image batch padded to a 2x2 mosaic)."""
    cfg = load_config(Config, CONFIGS / f"{name}.yaml")
    cfg.run.channels_last = B.CHANNELS_LAST  # the trainer lays the networks out (tools/bench.py --channels-last)
    if sam:
        cfg.sam.checkpoint = None
        cfg.sam.allow_random = True
        cfg.sam.pad_mosaic = True
    if name == "paper":
        if not sam:
            cfg.loss.lambda_sam = 0.0
        cfg.train.batch_size = 2
        cfg.discriminator.mbstd_group = 2
    return cfg


def _batch(cfg: Config, device: torch.device) -> dict[str, torch.Tensor]:
    b, r = cfg.train.batch_size, cfg.generator.img_resolution
    c = torch.nn.functional.one_hot(torch.arange(b) % cfg.generator.c_dim, cfg.generator.c_dim).float()
    return {
        "A": torch.rand(b, 4, r, r, device=device) * 2 - 1,
        "B": torch.rand(b, 1, r, r, device=device) * 2 - 1,
        "c": c.to(device),
        "delta": torch.rand(b, 1, device=device),
    }


def cases(config: str) -> list[BenchCase]:
    def train_setup_for(sam: bool):
        def train_setup(device: torch.device):
            from .train import Trainer

            cfg = _cfg(config, sam=sam)
            tr = Trainer(cfg, device)
            batch = _batch(cfg, device)
            return {
                "train_step": lambda: tr.step(batch, 0),
                "batch_size": cfg.train.batch_size,
                "params": sum(p.numel() for p in tr.G.parameters()),
                "notes": f"lambda_sam {cfg.loss.lambda_sam}" + (" (random ViT-B)" if tr.sam is not None else ""),
            }

        return train_setup

    def g_setup(device: torch.device):
        from .model import UniCOALGenerator

        cfg = _cfg(config)
        g = B.layout(UniCOALGenerator(cfg.generator).to(device).eval(), device)
        batch = _batch(cfg, device)
        z = torch.randn(cfg.train.batch_size, cfg.generator.z_dim, device=device)

        def infer():
            with torch.no_grad():
                return g(z, batch["c"], batch["delta"], batch["A"])

        return {"infer": infer, "batch_size": cfg.train.batch_size}

    out = [
        BenchCase(f"uni-coal/{config}/train_step", train_setup_for(False), "one D(+R1) and G(+L1, SAM unless dropped) iteration"),
        BenchCase(f"uni-coal/{config}/G_forward", g_setup, "G_ema forward (eval), batch of the config"),
    ]
    if config == "paper":  # issue 15: the paper's step cost includes the SAM ViT-B feature loss
        out.append(BenchCase(f"uni-coal/{config}/train_step_sam", train_setup_for(True),
                             "one D(+R1) and G(+L1, SAM ViT-B random-initialised) iteration"))
    return out

"""Benchmarks for tools/bench.py: train step (D + R1 + G + SAM) and G forward, demo and paper sizes."""

from __future__ import annotations

import torch

from medsynth_core.bench import BenchCase
from medsynth_core.config import bundled_configs, load_config

from .config import Config

CONFIGS = bundled_configs(__file__)


def _cfg(name: str) -> Config:
    cfg = load_config(Config, CONFIGS / f"{name}.yaml")
    if name == "paper":  # no SAM weights in the bench environment: time G/D without the SAM term
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
    def train_setup(device: torch.device):
        from .train import Trainer

        cfg = _cfg(config)
        tr = Trainer(cfg, device)
        batch = _batch(cfg, device)
        return {
            "train_step": lambda: tr.step(batch, 0),
            "batch_size": cfg.train.batch_size,
            "params": sum(p.numel() for p in tr.G.parameters()),
        }

    def g_setup(device: torch.device):
        from .model import UniCOALGenerator

        cfg = _cfg(config)
        g = UniCOALGenerator(cfg.generator).to(device).eval()
        batch = _batch(cfg, device)
        z = torch.randn(cfg.train.batch_size, cfg.generator.z_dim, device=device)

        def infer():
            with torch.no_grad():
                return g(z, batch["c"], batch["delta"], batch["A"])

        return {"infer": infer, "batch_size": cfg.train.batch_size}

    return [
        BenchCase(f"uni-coal/{config}/train_step", train_setup, "one D(+R1) and G(+L1, SAM) iteration"),
        BenchCase(f"uni-coal/{config}/G_forward", g_setup, "G_ema forward (eval), batch of the config"),
    ]

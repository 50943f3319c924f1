"""Benchmarks for ``tools/bench.py``: one training iteration (both G passes, D_B, D_A, G) and inference."""

from __future__ import annotations

from typing import Any

import torch

from medsynth_core import bench as B
from medsynth_core.bench import BenchCase
from medsynth_core.config import load_config

from .config import Config


def _config(config: str) -> Config:
    from .demo import DEMO_CONFIG

    if config == "demo":
        return load_config(Config, None, base=DEMO_CONFIG)
    if config == "paper":
        return Config()  # the dataclass defaults are the paper setting (configs/paper.yaml)
    raise ValueError(f"config must be 'demo' or 'paper', got {config!r}")


def _setup(config: str, device: torch.device) -> dict[str, Any]:
    from medsynth_core.training import count_parameters

    from .train import Trainer

    cfg = _config(config)
    cfg.run.device = str(device)
    cfg.run.channels_last = B.CHANNELS_LAST  # the trainer lays the networks out (tools/bench.py --channels-last)
    torch.manual_seed(0)
    from medsynth_core.distributed import DistInfo

    trainer = Trainer(cfg, DistInfo(0, 1, 0, device, None))
    s, bs = cfg.data.image_size, cfg.train.batch_size
    batch = {
        "a": torch.rand(bs, 1, s, s, device=device) * 2 - 1,
        "b": torch.rand(bs, 1, s, s, device=device) * 2 - 1,
    }
    x = torch.rand(1, 1, s, s, device=device) * 2 - 1
    cfg.train.skip_spike = False

    def infer() -> None:
        trainer.generator.translate(x, "a")

    return {
        "train_step": lambda: trainer.step(batch),
        "infer": infer,
        "batch_size": bs,
        "infer_batch_size": 1,
        "params": count_parameters(trainer.generator)["total"],
        "notes": f"{config}: {s}x{s}, batch {bs}, perceptual {cfg.loss.perceptual if cfg.loss.w_perc else 'off'}",
    }


def cases(config: str) -> list[BenchCase]:
    return [
        BenchCase(
            f"fda-vae/{config}",
            lambda device: _setup(config, device),
            "one training iteration (2 G passes, D_B, D_A, G step) and 1-slice A->B inference",
        )
    ]

"""Benchmarks for tools/bench.py: training step and one recovery call (R=2) for the demo and paper configs."""

from __future__ import annotations

import torch

from medsynth_core.bench import BenchCase, layout
from medsynth_core.training import count_parameters

from .config import build_diffusion, build_network, load
from .losses import drdm_loss


def cases(config: str) -> list[BenchCase]:
    cfg = load(config)

    def setup(device: torch.device) -> dict:
        net = layout(build_network(cfg).to(device), device)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.train.lr)
        diff = build_diffusion(cfg)
        b, s, nd = cfg.train.batch_size, cfg.diffusion.img_size, cfg.model.ndims
        x0 = torch.rand([b, 1] + [s] * nd, device=device)

        def train_step() -> None:
            t = torch.randint(0, cfg.diffusion.timesteps, (b,))
            xt, u_lab, _ = diff(x0, t)
            loss = drdm_loss(net(xt, t.to(device)), u_lab, cfg.diffusion.padding_mode)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        @torch.no_grad()
        def infer() -> None:
            net(x0[:1], torch.tensor([40], device=device), rec_num=cfg.model.rec_num)

        return {
            "train_step": train_step,
            "infer": infer,
            "batch_size": b,
            "infer_batch_size": 1,
            "params": count_parameters(net),
            "notes": "infer = one RecResACNet call (R=2); a full augmentation sample costs T=80 such calls",
        }

    return [BenchCase(f"drdm-{config}", setup, f"DRDM {config}: forward diffusion + RecResACNet + losses")]

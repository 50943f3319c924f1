"""Benchmarks for ``tools/bench.py``: train step, DDIM encode/decode, one inverse-optimisation iteration."""

from __future__ import annotations

import torch

from medsynth_core.bench import BenchCase, layout
from medsynth_core.config import bundled_configs, load_config

from .config import Config
from .diffusion import GaussianDiffusion
from .model import DiffAE

CONFIGS = bundled_configs(__file__)


def _cfg(config: str) -> Config:
    if config not in ("demo", "paper"):
        raise ValueError(f"config must be 'demo' or 'paper', got {config!r}")
    return load_config(Config, CONFIGS / f"{config}.yaml")


def cases(config: str) -> list[BenchCase]:
    cfg = _cfg(config)
    s = cfg.model.image_size
    ic = cfg.inverse

    def model_on(device):
        torch.manual_seed(0)
        return layout(DiffAE(cfg.model).to(device), device), GaussianDiffusion(cfg.diffusion.T)

    def train_step(device):
        model, d = model_on(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        b = cfg.train.batch_size
        x = torch.rand(b, 1, s, s, device=device) * 2 - 1

        def step():
            loss = d.loss(model, x, torch.randint(0, d.T, (b,), device=device), torch.randn_like(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()

        return {"train_step": step, "batch_size": b, "params": sum(p.numel() for p in model.parameters())}

    def encode_decode(device):
        model, d = model_on(device)
        model.eval()
        x = torch.rand(8, 1, s, s, device=device) * 2 - 1
        enc, dec = d.sampler(ic.encode_steps), d.sampler(ic.decode_steps)

        @torch.no_grad()
        def run():
            z = model.encode(x)
            dec.decode(model.eps_fn(z), enc.encode(model.eps_fn(z), x))

        return {
            "infer": run,
            "batch_size": 8,
            "notes": f"ddim{ic.encode_steps} encode + ddim{ic.decode_steps} decode",
        }

    def inverse_iteration(device):
        model, d = model_on(device)
        model.eval().requires_grad_(False)
        D = ic.K * 4 + 1  # n = 5 acquired slices
        xt = torch.randn(D, 1, s, s, device=device, requires_grad=True)
        z = torch.randn(D, cfg.model.z_channels, device=device, requires_grad=True)
        dec = d.sampler(ic.decode_steps)

        def run():
            out = dec.decode(model.eps_fn(z, ic.checkpoint), xt, grad=True)
            out.square().mean().backward()

        return {
            "infer": run,
            "batch_size": D,
            "notes": f"one inverse iteration, D={D} slices, ddim{ic.decode_steps}",
        }

    return [
        BenchCase(f"mgdcr-{config}-train-step", train_step, "DiffAE eps-MSE step (Adam, clip)"),
        BenchCase(
            f"mgdcr-{config}-encode-decode", encode_decode, "stochastic encoding + DDIM decode, 8 slices"
        ),
        BenchCase(
            f"mgdcr-{config}-inverse-iteration",
            inverse_iteration,
            "differentiable decode of all dense slices + backward",
        ),
    ]

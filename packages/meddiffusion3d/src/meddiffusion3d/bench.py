"""Benchmarks for ``tools/bench.py``: AE train step (demo), encode/decode latency and peak memory; BiFlowNet
train step, forward and time per sampling step; ControlNet forward.

``paper``: encoding a 256³ volume patch-wise (64³ patches, 8 per forward) and decoding its 32³ latent in
16³-latent tiles with the paper 8× model (34.8 M parameters) on the chosen device; heavy (≈10-20 min and
≈3.5 GB on 2 CPU cores). BiFlowNet at the paper size (157.7 M parameters) on a 16³ latent (a 128³ volume):
one training step (batch 1, L1 ε-loss, Adam), one forward, one DDIM sampling step; ControlNet-v1 forward.
"""

from __future__ import annotations

import torch

from medsynth_core.bench import BenchCase, layout
from medsynth_core.config import bundled_configs, load_config

from .config import Config, build_autoencoder
from .encode import decode_latent, patch_encode

CONFIGS = bundled_configs(__file__)


def _cfg(name: str) -> Config:
    return load_config(Config, CONFIGS / f"{name}.yaml")


def _train_step_case() -> BenchCase:
    def setup(device: torch.device) -> dict:
        from .config import build_discriminator
        from .losses import AELoss

        cfg = _cfg("demo")
        ae, disc = (
            layout(build_autoencoder(cfg.ae).to(device).train(), device),
            layout(build_discriminator(cfg.ae).to(device).train(), device),
        )
        loss_fn = AELoss(cfg.ae).to(device)
        opt = torch.optim.Adam(ae.trainable_parameters(), lr=cfg.ae.stage1.lr, betas=(0.5, 0.9))
        b, p = cfg.ae.stage1.batch_size, cfg.data.patch
        x = torch.rand(b, 1, p, p, p, device=device) * 2 - 1

        def step() -> None:
            opt.zero_grad()
            xr, vq = ae(x)
            loss, _ = loss_fn.generator(x, xr, vq, disc, step=10**6, disc_start=0, stage=1)
            loss.backward()
            opt.step()

        return {
            "train_step": step,
            "batch_size": b,
            "params": sum(q.numel() for q in ae.parameters()),
            "notes": "stage-1 generator step with GAN terms",
        }

    return BenchCase("ae_stage1_train_step", setup, "stage-1 generator step (L1 + commit + TP + GAN + FM)")


def _codec_case(config: str, side: int, chunk: int, mode: str, tile: int = 0) -> BenchCase:
    def setup(device: torch.device) -> dict:
        cfg = _cfg(config)
        torch.manual_seed(0)
        ae = layout(build_autoencoder(cfg.ae).to(device).eval(), device)
        p = cfg.data.patch
        x = torch.rand(1, 1, side, side, side, device=device) * 2 - 1
        if mode == "encode":

            def run() -> None:
                with torch.no_grad():
                    patch_encode(ae, x, p, chunk=chunk)
        else:
            lat = side // cfg.ae.downsample
            z = torch.randn(1, cfg.ae.embedding_dim, lat, lat, lat, device=device)

            def run() -> None:
                with torch.no_grad():
                    decode_latent(ae, z, quantize=True, tile=tile)

        return {
            "infer": run,
            "batch_size": 1,
            "params": sum(q.numel() for q in ae.parameters()),
            "notes": f"{side}³ volume, {p}³ patches, {chunk} per forward"
            if mode == "encode"
            else f"{side // cfg.ae.downsample}³ latent decoded " + (f"in {tile}³ tiles" if tile else "whole"),
        }

    return BenchCase(f"ae_{mode}_{side}", setup, f"{mode} a {side}³ volume ({config} config)")


def _denoiser_case(config: str, side: int, batch: int, mode: str) -> BenchCase:
    """BiFlowNet ``train`` step / ``forward`` / one DDIM ``sample`` step, or a ControlNet ``control`` forward."""

    def setup(device: torch.device) -> dict:
        from .biflownet import resolution_code
        from .config import build_biflownet, build_diffusion

        cfg = _cfg(config)
        torch.manual_seed(0)
        net = layout(build_biflownet(cfg.biflownet).to(device), device)
        diff = build_diffusion(cfg).to(device)
        c = cfg.biflownet.channels
        z = torch.randn(batch, c, side, side, side, device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        res = resolution_code((side,) * 3, batch, device=device)
        t = torch.full((batch,), diff.num_timesteps // 2, device=device, dtype=torch.long)
        params = sum(q.numel() for q in net.parameters())
        if mode == "train":
            opt = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
            net.train()

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                diff.training_loss(net, z, y=y, res=res).backward()
                opt.step()

            return {
                "train_step": step,
                "batch_size": batch,
                "params": params,
                "notes": f"{side}³ latent, L1 ε-loss + Adam",
            }
        net.eval()
        if mode == "control":
            from .controlnet import ControlledBiFlowNet

            m = layout(ControlledBiFlowNet(net, variant="v1").to(device).eval(), device)
            params = sum(q.numel() for q in m.controlnet.parameters())

            def run() -> None:
                with torch.no_grad():
                    m(z, t, y=y, res=res, hint=z)
        elif mode == "sample":

            def run() -> None:
                diff.sample(net, z, "ddim", steps=1, y=y, res=res)
        else:

            def run() -> None:
                with torch.no_grad():
                    net(z, t, y=y, res=res)

        notes = {"sample": "one DDIM step (time per sampling step)", "control": "ControlNet-v1 + frozen base"}
        return {
            "infer": run,
            "batch_size": batch,
            "params": params,
            "notes": f"{side}³ latent; " + notes.get(mode, "one denoiser forward"),
        }

    name = {
        "train": "biflownet_train_step",
        "forward": "biflownet_forward",
        "sample": "biflownet_sample_step",
        "control": "controlnet_forward",
    }[mode]
    return BenchCase(f"{name}_{side}", setup, f"{name} on a {side}³ latent ({config} config)")


def cases(config: str) -> list[BenchCase]:
    if config == "demo":
        return [
            _train_step_case(),
            _codec_case("demo", 32, 4, "encode"),
            _codec_case("demo", 32, 4, "decode"),
            _denoiser_case("demo", 8, 2, "train"),
            _denoiser_case("demo", 8, 2, "sample"),
        ]
    if config == "paper":
        # whole-grid decoding of a 32³ latent needs ~24 GB of activations on CPU: 16³ latent tiles (128³)
        return [
            _codec_case("paper", 256, 8, "encode"),
            _codec_case("paper", 256, 8, "decode", tile=16),
            _denoiser_case("paper", 16, 1, "train"),
            _denoiser_case("paper", 16, 1, "forward"),
            _denoiser_case("paper", 16, 1, "sample"),
            _denoiser_case("paper", 16, 1, "control"),
        ]
    raise ValueError(f"config must be 'demo' or 'paper', got {config!r}")

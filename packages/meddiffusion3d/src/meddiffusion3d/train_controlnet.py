"""ControlNet fine-tuning for degraded-input restoration (spec §4); restoration itself is in ``restore.py``.

The base BiFlowNet (EMA weights of a ``train`` checkpoint) is frozen; the ControlNet clone is trained with the
same diffusion loss on clean volumes ``x`` whose degraded version (``degrade.py``: thick slices, sparse-view or
limited-angle CT, undersampled k-space; our pipelines, spec §9) gives the hint: v1 encodes it with the frozen
autoencoder and normalises it like the training latents; v2 resizes the image to the latent grid. ``y`` is
``controlnet.class_label`` for every sample (official: 0). Restoration samples with the hint at every step and
decodes (no data-consistency step, as in the authors' code).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from medsynth_core import checkpoint as C
from medsynth_core import distributed as D
from medsynth_core import training as T
from medsynth_core.cli import UserError
from medsynth_core.config import config_to_dict, save_config

from .biflownet import resolution_code
from .config import Config, build_diffusion
from .controlnet import ControlledBiFlowNet, make_hint
from .data import VolumeSource, WholeVolumeDataset
from .generate import Generator
from .restore import CONTROLNET_KIND as KIND
from .restore import LatentEncoder, check_task_params, simulate
from .train import PACKAGE, draw_generators, save_denoise_preview


@torch.no_grad()
def encode_pair(x: torch.Tensor, cfg: Config, enc: LatentEncoder, step: int | str = "cache"):
    """Clean volumes (B, 1, D, H, W) → (normalised latent z0, hint) with the frozen AE."""
    if not torch.isfinite(x).all():
        raise UserError(f"step {step}: the input batch holds NaN/Inf; check the data files")
    z0 = enc(x)
    return z0, make_hint(simulate(x, cfg), cfg.controlnet.variant, z0.shape[2:], enc)


class _PairCache(torch.utils.data.Dataset):
    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        return self.pairs[i]


def cached_pairs(ds, cfg: Config, enc: LatentEncoder, device) -> _PairCache:
    """Encode every training volume (its epoch-0 stage-2 crop) and its degraded hint once
    (``controlnet.cache_latents``, the official latent-folder fine-tuning)."""
    pairs = []
    for i in range(len(ds)):
        z0, hint = encode_pair(ds[i][None].to(device), cfg, enc, f"cache volume {i}")
        pairs.append((z0[0].cpu(), hint[0].cpu()))
    return _PairCache(pairs)


def run_dir(cfg: Config) -> T.RunDir:
    return T.RunDir.create(cfg.run.root, PACKAGE, f"{cfg.run.name}/controlnet_{cfg.controlnet.task}")


def latest_checkpoint(cfg: Config) -> Path | None:
    d = Path(cfg.run.root) / PACKAGE / cfg.run.name / f"controlnet_{cfg.controlnet.task}" / "checkpoints"
    return C.CheckpointManager(d).latest()


def train_controlnet(cfg: Config, resume: str | Path | None = None) -> dict:
    """Fine-tune a ControlNet on the frozen base; returns ``run_dir``, ``start``, ``step`` and ``preempted``."""
    cc = cfg.controlnet
    if not cc.base:
        raise UserError(
            "controlnet.base is not set: pass controlnet.base=<BiFlowNet checkpoint from `train`>"
        )
    check_task_params(cc.task, cc.task_params)
    T.set_num_threads(cfg.run.threads)
    with D.distributed_session(cfg.run.device) as info:
        D.seed_everything(cfg.run.seed)
        device = info.device
        gen = Generator(cc.base, cfg.train.autoencoder, device=str(device))
        # the frozen base defines the denoiser and diffusion settings
        cfg = dataclasses.replace(cfg, biflownet=gen.cfg.biflownet, diffusion=gen.cfg.diffusion)
        source = VolumeSource(cfg.data, "train")
        ds = WholeVolumeDataset(source, cfg.data, seed=cfg.run.seed)
        m = ControlledBiFlowNet(
            gen.model, variant=cc.variant, hint_channels=cc.hint_channels, control_scales=cc.control_scales
        ).to(device)
        T.to_channels_last(m, T.channels_last_enabled(cfg.run.channels_last, device))  # issue 19
        diff = build_diffusion(cfg).to(device)
        opt = torch.optim.Adam(m.trainable_parameters(), lr=cc.lr)
        enc = LatentEncoder(gen)
        run = run_dir(cfg)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        start, _ = mgr.resume(
            resume, KIND, map_location=device, models={"controlnet": m.controlnet}, optimizers={"opt": opt}
        )
        ddp = D.wrap_ddp(m, info)
        if cc.cache_latents:
            ds = cached_pairs(ds, cfg, enc, device)
        loader = T.ResumableLoader(ds, cc.batch_size, seed=cfg.run.seed, num_workers=cfg.data.num_workers)
        ckpt_cfg = config_to_dict(cfg)
        if info.is_main:
            save_config(cfg, run.config)  # resolved: biflownet/diffusion are the frozen base's
        extra = {
            "base": str(cc.base),
            "autoencoder": str(cfg.train.autoencoder or gen.cfg.train.autoencoder or ""),
            "latent_norm": [gen.norm.lo, gen.norm.hi],
        }
        m.train()
        save = mgr.saver(
            KIND,
            main=info.is_main,
            models={"controlnet": m.controlnet},
            optimizers={"opt": opt},
            config=ckpt_cfg,
            extra=extra,
        )

        preempted, end = None, cc.steps
        with T.RunLogger(run, resume_step=start) as logger, T.PreemptionGuard() as stop:
            bar = T.progress(
                loader.iterate(start, cc.steps), total=cc.steps, initial=start, desc="controlnet"
            )
            for step, batch in bar:
                if cc.cache_latents:
                    z0, hint = (t.to(device) for t in batch)
                else:
                    z0, hint = encode_pair(batch.to(device), cfg, enc, step)
                y = torch.full((z0.shape[0],), cc.class_label, dtype=torch.long, device=device)
                g = draw_generators(cfg, step, z0.shape[0], info.rank, device)
                opt.zero_grad(set_to_none=True)
                loss = diff.training_loss(
                    ddp,
                    z0,
                    y=y,
                    res=resolution_code(z0.shape[2:], z0.shape[0], device=device),
                    hint=hint,
                    generator=g,
                )
                loss.backward()
                opt.step()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"controlnet step {step}: loss is {float(loss)}")
                if T.due(step + 1, cc.log_every, cc.steps):
                    logger.log(
                        step + 1, D.all_reduce_dict({"loss": float(loss.detach())}), prefix="controlnet"
                    )
                if info.is_main and T.due(step + 1, cc.sample_every, cc.steps):
                    save_denoise_preview(run.images / f"step_{step + 1:08d}.png", m, diff, z0, y, hint=hint,
                                         seed=cfg.run.seed)  # fmt: skip
                if stop.checkpoint_step(step + 1, cc.ckpt_every, cc.steps, save):  # SIGTERM: this step saved, leave
                    preempted, end = stop.signal_name, step + 1
                    break
        D.barrier()
    return {"run_dir": str(run.path), "start": int(start), "step": int(end), "preempted": preempted}

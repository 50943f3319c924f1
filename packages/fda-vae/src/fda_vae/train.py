"""Training loop of spec §3: both generator passes, abnormal-batch skip, D_B then D_A, then G.

Single process or ``torchrun`` (DDP via ``medsynth_core.distributed``; no unused parameters because the
dead ``proj_attn`` is not built). Checkpoints through ``CheckpointManager`` resume bit-exactly on CPU.
"""

from __future__ import annotations

import collections
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsynth_core import checkpoint as C
from medsynth_core import distributed as D
from medsynth_core import training as T
from medsynth_core.config import config_to_dict, save_config
from medsynth_core.metrics import psnr
from medsynth_core.viz import save_grid

from .amp import autocast, grad_scaler, resolve_amp
from .config import KIND, Config
from .losses import PerceptualLoss, discriminator_loss, generator_loss, reconstruction_loss
from .model import FDAVAE, GeneratorOutput, build_discriminators, build_generator

log = logging.getLogger("fda_vae")


class GeneratorPair(nn.Module):
    """Both generator passes in one forward (one DDP forward per backward): G(B,'b') then G(A,'a'),
    the official order (train_v3.py:107-118), so the noise draws follow the official sequence."""

    def __init__(self, generator: FDAVAE):
        super().__init__()
        self.generator = generator

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor, noise=None) -> tuple[torch.Tensor, ...]:
        nb = na = None
        if noise is not None:  # ε draws 0, 1 for G(B), 2, 3 for G(A): the official order
            nb, na = (lambda k, like: noise(k, like)), (lambda k, like: noise(2 + k, like))
        ob = self.generator(x_b, "b", noise=nb)
        oa = self.generator(x_a, "a", noise=na)
        return (oa.own, oa.cross, oa.mu, oa.sigma, oa.logvar, ob.own, ob.cross, ob.mu, ob.sigma, ob.logvar)


def _unpack(t: tuple[torch.Tensor, ...]) -> tuple[GeneratorOutput, GeneratorOutput]:
    return (GeneratorOutput(*t[:5], src="a"), GeneratorOutput(*t[5:], src="b"))


def to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class Trainer:
    """Holds the networks, optimisers and spike window; ``step(batch)`` is one training iteration."""

    def __init__(self, cfg: Config, info: D.DistInfo | None = None):
        self.cfg = cfg
        self.info = info or D.DistInfo(0, 1, 0, torch.device("cpu"), None)
        dev = self.info.device
        cl = T.channels_last_enabled(cfg.run.channels_last, dev)  # issue 19 (auto: CUDA only)
        self.generator = T.to_channels_last(build_generator(cfg.model).to(dev), cl)
        self.discs = {k: T.to_channels_last(v.to(dev), cl) for k, v in build_discriminators(cfg.model, cfg.disc).items()}
        self.pair = D.wrap_ddp(GeneratorPair(self.generator), self.info)
        self.ddp_discs = {k: D.wrap_ddp(v, self.info) for k, v in self.discs.items()}
        lc = cfg.loss
        self.perceptual = None
        if lc.w_perc > 0 and lc.perceptual != "none":
            self.perceptual = T.to_channels_last(
                PerceptualLoss(lc.perceptual, lc.perceptual_weights, lc.perceptual_seed).to(dev), cl
            )
        tc = cfg.train
        adam = dict(betas=tuple(tc.betas))  # no weight decay; LambdaLR ≡ 1 so the lr is constant (spec §3)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=tc.lr_g, **adam)
        self.opt_d = {k: torch.optim.Adam(v.parameters(), lr=tc.lr_d, **adam) for k, v in self.discs.items()}
        self.spikes: collections.deque[float] = collections.deque(maxlen=tc.skip_spike_window)
        self.skipped = 0
        self.amp = resolve_amp(cfg.run.amp, dev)  # "off" on CPU: CPU runs are plain fp32
        self.scaler = grad_scaler(self.amp)  # enabled only for fp16; disabled it is the identity

    def set_lr(self, step: int, total: int) -> float:
        """Learning-rate factor of ``train.lr_schedule`` at ``step`` (0-based) of ``total`` (applied to G and
        both D). ``constant`` is the official LambdaLR ≡ 1; ``cosine`` is ½(1 + cos(π·step/horizon))."""
        tc = self.cfg.train
        if tc.lr_schedule == "constant":
            return 1.0
        horizon = tc.lr_decay_steps or total
        factor = 0.5 * (1.0 + math.cos(math.pi * min(step, horizon) / horizon))
        for opt, lr in ((self.opt_g, tc.lr_g), *((o, tc.lr_d) for o in self.opt_d.values())):
            for group in opt.param_groups:
                group["lr"] = lr * factor
        return factor

    # --------------------------------------------------------------------------------- one step
    def is_spike(self, rec: float) -> bool:
        """Abnormal-batch rule (train_v3.py:120-143): with more than ``skip_spike_min`` values in the
        window, L_rec > factor × window mean skips the batch on every rank; the value is still pushed.
        ``run.deterministic`` judges the global batch's mean (official: each rank its own batch; a spike
        on any rank skips all)."""
        tc = self.cfg.train
        if self.cfg.run.deterministic:  # the global batch's mean L_rec (equal local batches), as one process sees it
            rec = D.all_reduce_dict({"rec": rec}, op="mean")["rec"]
        local = len(self.spikes) > tc.skip_spike_min and rec > tc.skip_spike_factor * (
            sum(self.spikes) / len(self.spikes)
        )
        self.spikes.append(rec)
        return D.all_reduce_dict({"skip": float(local)}, op="max")["skip"] > 0

    def keyed_noise(self, step: int):
        """``run.deterministic`` (issue 18): ε of each sample from a generator keyed by (seed, step, the
        sample's position in the global batch, which draw), so N ranks and one process at the same global
        batch draw the same ε whatever the split. Returns ``noise(k, like)`` for :meth:`FDAVAE.forward`."""
        seed = self.cfg.run.seed

        def noise(k: int, like: torch.Tensor) -> torch.Tensor:
            eps = []
            for pos in T.global_positions(like.shape[0]):
                with T.keyed_rng(seed, step, pos, k):
                    eps.append(torch.randn(like.shape[1:], dtype=torch.float32))
            return torch.stack(eps).to(device=like.device, dtype=like.dtype)

        return noise

    def step(self, batch: dict[str, Any], step: int | None = None) -> dict[str, float]:
        """One iteration; ``step`` (0-based) keys the draws of ``run.deterministic`` and is needed there."""
        dev = self.info.device
        x_a = batch["a"].to(dev, non_blocking=True)
        x_b = batch["b"].to(dev, non_blocking=True)
        noise = None
        if self.cfg.run.deterministic:
            if step is None:
                raise ValueError("run.deterministic needs the step index: call Trainer.step(batch, step)")
            noise = self.keyed_noise(step)
        self.pair.train()
        with autocast(self.amp, dev):
            out_a, out_b = _unpack(self.pair(x_a, x_b, noise=noise))
        if self.cfg.train.skip_spike:
            rec = float(reconstruction_loss(out_a, out_b, x_a, x_b).detach())
            if self.is_spike(rec):
                self.skipped += 1
                return {"skipped": 1.0, "rec": rec}
        # D_B (judges A→B vs real B), then D_A (B→A vs real A), on the pre-update fakes
        logs: dict[str, float] = {}
        for k, real, fake in (("b", x_b, out_a.cross), ("a", x_a, out_b.cross)):
            self.opt_d[k].zero_grad(set_to_none=True)
            with autocast(self.amp, dev):
                loss_d = discriminator_loss(self.ddp_discs[k], real, fake)
            self.scaler.scale(loss_d).backward()
            self.scaler.step(self.opt_d[k])
            logs[f"d_{k}"] = float(loss_d.detach())
        # G against the just-updated critics (plain modules, frozen for this pass)
        for d in self.discs.values():
            d.requires_grad_(False)
        try:
            self.opt_g.zero_grad(set_to_none=True)
            with autocast(self.amp, dev):
                g = generator_loss(
                    self.cfg.loss, out_a, out_b, x_a, x_b, self.discs["a"], self.discs["b"], self.perceptual
                )
            self.scaler.scale(g.total).backward()
            self.scaler.step(self.opt_g)
            self.scaler.update()  # once per iteration, after all three optimiser steps
        finally:
            for d in self.discs.values():
                d.requires_grad_(True)
        logs.update({k: float(v.detach()) for k, v in g.terms.items()})
        logs["g_total"] = float(g.total.detach())
        logs["skipped"] = 0.0
        if not all(math.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"non-finite loss: {logs}; lower the learning rate or check the data")
        return logs

    # ------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, dataset, step: int) -> dict[str, float]:
        """Per-slice PSNR (spec §6.10 fix) on [0,1] and MAE on [−1,1] in both directions, sharded
        over ranks and summed. Deterministic −μ unless ``train.val_sampled`` (own seeded generator)."""
        g = self.generator
        g.eval()
        dev = self.info.device
        gen = None
        if self.cfg.train.val_sampled:
            gen = torch.Generator(device=dev).manual_seed(self.cfg.run.seed * 7919 + step)
        sums = {"psnr_a2b": 0.0, "psnr_b2a": 0.0, "mae_a2b": 0.0, "mae_b2a": 0.0, "n": 0.0}
        idx = list(range(self.info.rank, len(dataset), self.info.world_size))
        bs = self.cfg.eval.batch_size
        for i in range(0, len(idx), bs):
            items = [dataset[j] for j in idx[i : i + bs]]
            a = torch.stack([it["a"] for it in items]).to(dev)
            b = torch.stack([it["b"] for it in items]).to(dev)
            s = self.cfg.train.val_sampled
            with autocast(self.amp, dev):
                a2b = g.translate(a, "a", sample=s, generator=gen).float()
                b2a = g.translate(b, "b", sample=s, generator=gen).float()
            sums["psnr_a2b"] += float(psnr(to01(a2b), to01(b), 1.0).clamp(max=100.0).sum())
            sums["psnr_b2a"] += float(psnr(to01(b2a), to01(a), 1.0).clamp(max=100.0).sum())
            sums["mae_a2b"] += float((a2b - b).abs().flatten(1).mean(1).sum())
            sums["mae_b2a"] += float((b2a - a).abs().flatten(1).mean(1).sum())
            sums["n"] += len(items)
        tot = D.all_reduce_dict(sums, op="sum")
        n = max(tot.pop("n"), 1.0)
        g.train()
        return {k: v / n for k, v in tot.items()}

    @torch.no_grad()
    def save_samples(self, dataset, path: Path, n: int = 4) -> Path:
        """Grid with columns A, A→B, B, B→A (deterministic)."""
        g = self.generator
        g.eval()
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        a = torch.stack([it["a"] for it in items]).to(self.info.device)
        b = torch.stack([it["b"] for it in items]).to(self.info.device)
        with autocast(self.amp, self.info.device):
            a2b, b2a = g.translate(a, "a").float(), g.translate(b, "b").float()
        g.train()
        rows = [[a[i, 0].cpu(), a2b[i, 0].cpu(), b[i, 0].cpu(), b2a[i, 0].cpu()] for i in range(len(items))]
        titles = [["A", "A->B", "B", "B->A"]] + [[None] * 4] * (len(rows) - 1)
        return save_grid(path, rows, titles=titles, value_range=(-1.0, 1.0))

    # ------------------------------------------------------------------------------ checkpoints
    def models(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "disc_a": self.discs["a"], "disc_b": self.discs["b"]}

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": self.opt_g, "d_a": self.opt_d["a"], "d_b": self.opt_d["b"]}

    def checkpoint(self, step: int, epoch: int, best: float) -> dict[str, Any]:
        return C.build_checkpoint(
            kind=KIND,
            step=step,
            epoch=epoch,
            models=self.models(),
            optimizers=self.optimizers(),
            config=config_to_dict(self.cfg),
            extra={
                "spikes": list(self.spikes),
                "skipped": self.skipped,
                "best_psnr": best,
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}),
            },
        )

    def restore(self, ckpt: dict[str, Any], source: str) -> tuple[int, float]:
        step, _ = C.restore_checkpoint(
            ckpt, models=self.models(), optimizers=self.optimizers(), source=source
        )
        extra = ckpt.get("extra") or {}
        self.spikes.clear()
        self.spikes.extend(float(v) for v in extra.get("spikes", []))
        self.skipped = int(extra.get("skipped", 0))
        if self.scaler.is_enabled() and extra.get("grad_scaler"):
            self.scaler.load_state_dict(extra["grad_scaler"])
        return step, float(extra.get("best_psnr", -math.inf))


def train(cfg: Config, resume: str | None = None, datasets=None) -> dict[str, Any]:
    """Run training for ``cfg``; resumes from ``resume`` or the run directory's latest checkpoint."""
    from medsynth_core.atomic import check_output_path

    from .data import build_datasets

    check_output_path(Path(cfg.run.root) / KIND / cfg.run.name, what="run folder")  # before the data (issue 18)
    T.set_num_threads(cfg.run.threads)
    with D.distributed_session(cfg.run.device) as info:
        D.seed_everything(cfg.run.seed)
        train_ds, val_ds = datasets if datasets is not None else build_datasets(cfg)
        run = T.RunDir.create(cfg.run.root, KIND, cfg.run.name)
        if info.is_main:
            save_config(cfg, run.config)
        D.barrier()
        trainer = Trainer(cfg, info)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        tc = cfg.train
        loader = T.ResumableLoader(
            train_ds,
            tc.batch_size,
            seed=cfg.run.seed,
            shuffle=True,
            drop_last=True,
            num_workers=cfg.train.num_workers,
        )
        total = tc.steps if tc.steps > 0 else tc.epochs * loader.steps_per_epoch
        val_every = tc.val_every or loader.steps_per_epoch
        start, best = 0, -math.inf
        src = mgr.resume_source(resume)
        if src is not None:
            start, best = trainer.restore(C.load_checkpoint(src, kind=KIND), str(src))
            log.info("resumed from %s at step %d", src, start)
        last: dict[str, float] = {}
        val: dict[str, float] = {}
        preempted = None
        with T.RunLogger(run, resume_step=start) as logger, T.PreemptionGuard() as stop:
            for step, batch in T.progress(
                loader.iterate(start, total), total=total, initial=start, desc=KIND
            ):
                lr_factor = trainer.set_lr(step, total)
                last = trainer.step(batch, step)
                last["lr_factor"] = lr_factor
                done = step + 1
                if T.due(done, tc.log_every, total):
                    logger.log(done, last)
                if T.due(done, val_every, total):
                    val = trainer.validate(val_ds, done)
                    logger.log(done, val, prefix="val", console=True)
                    if info.is_main and val["psnr_a2b"] > best:  # best by validation A→B PSNR (spec §3)
                        best = val["psnr_a2b"]
                        mgr.save(
                            trainer.checkpoint(done, done // loader.steps_per_epoch, best), name="best.pt"
                        )
                if info.is_main and T.due(done, tc.sample_every, total):
                    trainer.save_samples(val_ds, run.images / f"step_{done:08d}.png")
                saved = T.due(done, tc.ckpt_every, total)
                if info.is_main and saved:
                    mgr.save(trainer.checkpoint(done, done // loader.steps_per_epoch, best))
                if stop.should_stop():  # SIGTERM (preemption): checkpoint this step, leave on every rank
                    if info.is_main and not saved:
                        mgr.save(trainer.checkpoint(done, done // loader.steps_per_epoch, best))
                    preempted = stop.signal_name
                D.barrier()
                if preempted:
                    break
        return {
            "run": str(run.path),
            "steps": total,
            "step": done if preempted else total,
            "preempted": preempted,
            "start": start,
            "last": last,
            "val": val,
            "best_psnr": best,
            "skipped": trainer.skipped,
            "checkpoint": str(mgr.latest()) if mgr.latest() else None,
        }

"""Training of the patch-volume autoencoder, stage 1 (patches) and stage 2 (joint decoder), spec §1.3.

Single process or ``torchrun`` (DDP through medsynth-core). Each step is either a generator step or,
once ``step >= disc_start``, alternately a discriminator step (``step % 2 == 1``), like the official
Lightning loop whose ``global_step`` counts both. Checkpoints (atomic, with RNG states) resume exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from medsynth_core import checkpoint as C
from medsynth_core import distributed as D
from medsynth_core import training as T
from medsynth_core.cli import UserError
from medsynth_core.config import config_to_dict, save_config
from medsynth_core.viz import save_volume_views

from . import precision as P
from .config import Config, build_autoencoder, build_discriminator
from .data import PatchDataset, VolumeSource, WholeVolumeDataset
from .discriminator import DiscriminatorPair
from .infer import AE_KIND as KIND
from .losses import AELoss

log = logging.getLogger("meddiffusion3d")
PACKAGE = "meddiffusion3d"


def run_dir(cfg: Config, stage: int) -> T.RunDir:
    return T.RunDir.create(cfg.run.root, PACKAGE, f"{cfg.run.name}/stage{stage}")


def latest_checkpoint(cfg: Config, stage: int) -> Path | None:
    return C.CheckpointManager(
        Path(cfg.run.root) / PACKAGE / cfg.run.name / f"stage{stage}" / "checkpoints"
    ).latest()


def _stage_cfg(cfg: Config, stage: int):
    return cfg.ae.stage1 if stage == 1 else cfg.ae.stage2


def keyed_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """CPU generator keyed by (seed, step, stream), the same on every rank (``run.deterministic``)."""
    key = np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(key[0]) << 32 | int(key[1])) % (2**63))


def set_step_generators(ae, loss_fn: AELoss, cfg: Config, step: int) -> None:
    """``run.deterministic`` (issue 18): the codebook's restart codes and the tri-plane slices of this step
    come from generators keyed by (seed, step), drawn over the whole global batch (see ``Codebook`` and
    ``TriPlanePerceptual``), so N ranks train as one process at the same global batch. Off: per-rank draws."""
    on = cfg.run.deterministic
    ae.codebook.generator = keyed_generator(cfg.run.seed, step, 0) if on else None
    if loss_fn.perceptual is not None:
        loss_fn.perceptual.generator = keyed_generator(cfg.run.seed, step, 1) if on else None


def train_ae(
    cfg: Config, stage: int, resume: str | Path | None = None, init: str | Path | None = None
) -> dict:
    """Train one stage; returns ``run_dir``, ``start``, ``step`` and ``preempted`` (the signal's name when SIGTERM
    stopped it after checkpointing that step). Stage 2 starts from ``init`` (a stage-1 checkpoint; default: the
    latest of this run name's stage 1)."""
    if stage not in (1, 2):
        raise UserError(f"--stage must be 1 or 2, got {stage}")
    sc = _stage_cfg(cfg, stage)
    T.set_num_threads(cfg.run.threads)
    with D.distributed_session(cfg.run.device) as info:
        D.seed_everything(cfg.run.seed)
        source = VolumeSource(cfg.data, "train")  # data errors before any run folder is created
        run = run_dir(cfg, stage)
        device = info.device
        ae = build_autoencoder(cfg.ae).to(device)
        disc = build_discriminator(cfg.ae).to(device)
        cl = T.channels_last_enabled(cfg.run.channels_last, device)  # issue 19 (auto: CUDA only)
        for net in (ae, disc):
            T.to_channels_last(net, cl)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        resume_path = mgr.resume_source(resume)
        if stage == 2 and resume_path is None:
            src = Path(init) if init else latest_checkpoint(cfg, 1)
            if src is None:
                raise UserError(
                    "stage 2 needs a stage-1 checkpoint: train --stage 1 first or pass --init PATH"
                )
            ck = C.load_checkpoint(src, kind=KIND, map_location=device)
            C.load_module_state(ae, ck["models"]["ae"], source=f"{src} [ae]")
            if "disc" in ck["models"]:
                C.load_module_state(disc, ck["models"]["disc"], source=f"{src} [disc]")
            log.info("stage 2 initialised from %s", src)
        ae.set_stage(stage)
        loss_fn = AELoss(cfg.ae).to(device)
        opt_ae = torch.optim.Adam(ae.trainable_parameters(), lr=sc.lr, betas=tuple(sc.betas))
        opt_d = torch.optim.Adam(disc.parameters(), lr=sc.lr, betas=tuple(sc.betas))
        # fp16 only (ae.stageN.amp=fp16): one GradScaler per optimiser, not checkpointed (its scale re-warms
        # after a resume); disabled for off/bf16 and on CPU
        scaler_ae, scaler_d = P.grad_scaler(device, sc.amp), P.grad_scaler(device, sc.amp)
        start = 0
        if resume_path is not None:
            ck = C.load_checkpoint(resume_path, kind=KIND, map_location=device)
            if int((ck.get("extra") or {}).get("stage", 1)) != stage:
                raise UserError(
                    f"{resume_path} is a stage-{ck['extra'].get('stage')} checkpoint, not stage {stage}"
                )
            start, _ = C.restore_checkpoint(
                ck,
                models={"ae": ae, "disc": disc},
                optimizers={"opt_ae": opt_ae, "opt_d": opt_d},
                source=str(resume_path),
            )
            log.info("resumed from %s at step %d", resume_path, start)
        ae_ddp = D.wrap_ddp(ae, info)
        pair_ddp = D.wrap_ddp(DiscriminatorPair(disc), info)

        if stage == 1:
            ds = PatchDataset(
                source, cfg.data.patch, seed=cfg.run.seed, flip_p=cfg.data.flip_p, rot_p=cfg.data.rot_p
            )
        else:
            ds = WholeVolumeDataset(source, cfg.data, seed=cfg.run.seed, augment=True, batch=sc.batch_size)
        loader = T.ResumableLoader(ds, sc.batch_size, seed=cfg.run.seed, num_workers=cfg.data.num_workers)
        patch = cfg.data.patch if stage == 2 else None
        ckpt_cfg = config_to_dict(cfg)
        if info.is_main:
            save_config(cfg, run.config)  # the resolved config beside the checkpoints

        save = mgr.saver(
            KIND,
            main=info.is_main,
            models={"ae": ae, "disc": disc},
            optimizers={"opt_ae": opt_ae, "opt_d": opt_d},
            config=ckpt_cfg,
            extra={"stage": stage},
        )

        ae.train()
        disc.train()
        loss_fn.train()
        if cfg.run.deterministic and info.world_size > 1 and (sc.disc_start < sc.steps or cfg.ae.norm_type == "batch"):
            log.warning("run.deterministic: BatchNorm (the discriminator's from step %d%s) normalises each "
                        "process's batch, so from there %d ranks differ from one process at the same global batch",
                        sc.disc_start, "; the AE's, ae.norm_type=batch" if cfg.ae.norm_type == "batch" else "",
                        info.world_size)  # fmt: skip
        preempted, end = None, sc.steps
        with T.RunLogger(run, resume_step=start) as logger, T.PreemptionGuard() as stop:
            bar = T.progress(
                loader.iterate(start, sc.steps), total=sc.steps, initial=start, desc=f"stage {stage}"
            )
            for step, batch in bar:
                x = batch.to(device, non_blocking=True)
                set_step_generators(ae, loss_fn, cfg, step)
                if not torch.isfinite(x).all():
                    raise UserError(f"step {step}: the input batch holds NaN/Inf; check the data files")
                d_step = step >= sc.disc_start and step % 2 == 1
                if not d_step:
                    opt_ae.zero_grad(set_to_none=True)
                    disc.requires_grad_(False)
                    with P.autocast(device, sc.amp):
                        x_recon, vq = ae_ddp(x, patch=patch)
                        loss, logs = loss_fn.generator(
                            x, x_recon.float(), vq, disc, step, sc.disc_start, stage
                        )
                    scaler_ae.scale(loss).backward()
                    disc.requires_grad_(True)
                    scaler_ae.step(opt_ae)
                    scaler_ae.update()
                else:
                    opt_d.zero_grad(set_to_none=True)
                    with torch.no_grad(), P.autocast(device, sc.amp):
                        x_recon, vq = ae(x, patch=patch)  # codebook EMA still runs, as in the official code
                    with P.autocast(device, sc.amp):
                        real, fake = pair_ddp(x.detach(), x_recon.detach().float())
                        loss, logs = loss_fn.discriminator(real.float(), fake.float())
                    scaler_d.scale(loss).backward()
                    scaler_d.step(opt_d)
                    scaler_d.update()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"stage {stage} step {step}: loss is {float(loss)}")
                if T.due(step + 1, sc.log_every, sc.steps):
                    logger.log(
                        step + 1,
                        D.all_reduce_dict({k: float(v) for k, v in logs.items()}),
                        prefix=f"stage{stage}",
                    )
                if info.is_main and T.due(step + 1, sc.sample_every, sc.steps):
                    save_volume_views(
                        run.images / f"step_{step + 1:08d}.png",
                        [x[0, 0].detach().cpu(), x_recon[0, 0].detach().float().cpu()],
                        titles=["input", "reconstruction"],
                        value_range=(-1.0, 1.0),
                    )
                if stop.checkpoint_step(step + 1, sc.ckpt_every, sc.steps, save):  # SIGTERM: this step saved, leave
                    preempted, end = stop.signal_name, step + 1
                    break
        D.barrier()
    return {"run_dir": str(run.path), "start": int(start), "step": int(end), "preempted": preempted}

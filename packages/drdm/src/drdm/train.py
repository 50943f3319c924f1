"""Training of the recovery network (spec sections 3 and 7, Alg. 1): single process or torchrun (DDP)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from medsynth_core import checkpoint as C
from medsynth_core import distributed as D
from medsynth_core import training as T
from medsynth_core.cli import UserError
from medsynth_core.config import config_to_dict, save_config
from medsynth_core.viz import save_grid

from .config import DRDMConfig, build_diffusion, build_network
from .data import TrainAugment, build_dataset
from .deform import warp
from .infer import KIND
from .losses import drdm_loss


def _device(name: str) -> str | None:
    return None if name == "auto" else name


def save_preview(path: Path, x0: torch.Tensor, xt: torch.Tensor, rec: torch.Tensor) -> None:
    def mid(v: torch.Tensor) -> torch.Tensor:
        v = v[0, 0].detach().float().cpu()
        return v[v.shape[0] // 2] if v.ndim == 3 else v

    save_grid(path, [mid(x0), mid(xt), mid(rec)], titles=["x0", "I_t", "W(I_t, psi)"], value_range=(0.0, 1.0))


def _keyed_forward(x0: torch.Tensor, step: int, seed: int, augment, diffusion, timesteps: int):
    """``run.deterministic``: each sample's augmentation, level and forward-process draws come from
    generators keyed by (seed, step, its position in the global batch), so they do not depend on how the
    global batch is split over ranks."""
    outs = []
    for j, pos in enumerate(T.global_positions(x0.shape[0])):
        with T.keyed_rng(seed, step, pos):
            xj = augment(x0[j : j + 1])
            tj = torch.randint(0, timesteps, (1,))
            x_t, u_lab, _ = diffusion(xj, tj)
        outs.append((xj, tj, x_t, u_lab))
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def lr_at(tc, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): ``train.lr`` times a linear warm-up over
    ``train.warmup_steps`` and, for ``lr_schedule=cosine``, a cosine decay to 0 at ``train.steps``. A function
    of the step alone, so a resumed run continues the schedule exactly."""
    f = 1.0
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        f = (step + 1) / tc.warmup_steps
    elif tc.lr_schedule == "cosine":
        span = max(1, tc.steps - tc.warmup_steps)
        f = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - tc.warmup_steps) / span)))
    return tc.lr * f


def train(cfg: DRDMConfig, resume: str | None = None, max_steps: int | None = None) -> dict[str, Any]:
    """Train ``cfg.train.steps`` optimiser steps (or stop at ``max_steps``). Resumes from ``resume`` or the
    run directory's latest checkpoint (never from foreign files; Q9). Returns the final metrics."""
    tc, rc = cfg.train, cfg.run
    T.set_num_threads(rc.threads)
    with D.distributed_session(_device(rc.device)) as info:
        D.seed_everything(rc.seed)
        run = T.RunDir.create(rc.root, "drdm", rc.name)
        net = T.to_channels_last(build_network(cfg).to(info.device),
                                 T.channels_last_enabled(rc.channels_last, info.device))  # issue 19
        if tc.out_init_scale != 1.0:  # a resumed run overwrites this with the checkpoint's weights
            with torch.no_grad():
                net.conv_out.weight.mul_(tc.out_init_scale)
                net.conv_out.bias.mul_(tc.out_init_scale)
        model = D.wrap_ddp(net, info)
        opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=tc.lr)
        state: dict[str, Any] = {"models": {"network": net}, "optimizers": {"adam": opt}}
        ema = T.EMA(net, tc.ema_decay) if tc.ema_decay > 0 else None
        if ema is not None:
            state["emas"] = {"network": ema}
        mgr = C.CheckpointManager(run.checkpoints, keep_last=rc.keep_last)
        start, resumed = mgr.resume(resume, KIND, **state)
        if info.is_main:
            save_config(cfg, run.config)
        diffusion = build_diffusion(cfg, sampling=False)
        augment = TrainAugment(cfg.model.ndims, tc.noise_scale, tc.geometric_aug)
        dataset = build_dataset(cfg)
        try:
            loader = T.ResumableLoader(dataset, tc.batch_size, seed=rc.seed, num_workers=tc.num_workers)
        except ValueError as exc:
            raise UserError(f"data: {exc}") from exc
        end = tc.steps if max_steps is None else min(tc.steps, max_steps)
        last: dict[str, float] = {}
        preempted = None

        save = mgr.saver(KIND, **state, config=config_to_dict(cfg))

        with T.RunLogger(run, resume_step=start) as logger, T.PreemptionGuard() as stop:
            for step, x0 in T.progress(
                loader.iterate(start, end), total=end, initial=start, desc="drdm train"
            ):
                model.train()
                if rc.deterministic:
                    x0, t, x_t, u_lab = _keyed_forward(x0.to(info.device).float(), step, rc.seed, augment,
                                                       diffusion, cfg.diffusion.timesteps)  # fmt: skip
                else:
                    x0 = augment(x0.to(info.device).float())
                    t = torch.randint(0, cfg.diffusion.timesteps, (x0.shape[0],))
                    x_t, u_lab, _ = diffusion(x0, t)
                pred = model(x_t, t.to(info.device), rec_num=cfg.model.rec_num)
                terms = drdm_loss(
                    pred,
                    u_lab,
                    cfg.diffusion.padding_mode,
                    tc.w_dist,
                    tc.w_ang,
                    tc.w_reg,
                    tc.detj_weight,
                    tc.true_negdetj_weight,
                    tc.dist_eps,
                )
                if not math.isfinite(terms["loss"].item()):
                    raise FloatingPointError(f"non-finite loss at step {step}: {terms}")
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                if tc.lr_schedule != "constant" or tc.warmup_steps > 0:
                    for group in opt.param_groups:
                        group["lr"] = lr_at(tc, step)
                opt.step()
                if ema is not None:
                    ema.update(net)
                done = step + 1
                last = D.all_reduce_dict({k: v.detach() for k, v in terms.items()})
                if T.due(done, tc.log_every, end):
                    logger.log(done, last)
                if info.is_main and T.due(done, tc.sample_every, end):
                    with torch.no_grad():
                        rec = warp(
                            x_t, pred.detach(), mode="bilinear", padding_mode=cfg.diffusion.img_pad_mode
                        )
                    save_preview(run.images / f"step_{done:08d}.png", x0, x_t, rec)
                saved = T.due(done, tc.ckpt_every, end)
                if info.is_main and saved:
                    save(done)
                if stop.should_stop():  # SIGTERM (preemption): checkpoint this step, leave on every rank
                    if info.is_main and not saved:
                        save(done)
                    preempted, end = stop.signal_name, done
                D.barrier()
                if preempted:
                    break
        return {
            "step": end,
            "preempted": preempted,
            "start": int(start),  # the step this call resumed from (0: fresh start)
            "resumed_from": str(resumed) if resumed is not None else None,
            "run_dir": str(run.path),
            **{k: float(v) for k, v in last.items()},
        }

"""DiffAE prior training (spec §1.3): ε-MSE, Adam (wd 0, no warm-up), global-norm clip, EMA every step,
single process or torchrun/DDP, exact resume through core's CheckpointManager."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from medsynth_core import checkpoint as C
from medsynth_core import distributed as D
from medsynth_core import training as T
from medsynth_core.config import config_to_dict, save_config

from .config import Config, TrainConfig
from .data import build_datasets
from .diffusion import GaussianDiffusion
from .infer import PRIOR_KIND as KIND
from .infer import load_prior
from .model import DiffAE


@torch.no_grad()
def save_samples(
    path: Path, model: DiffAE, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int, seed: int
) -> None:
    """Originals, reconstructions with inferred x_T, and samples with random x_T and the same z_sem."""
    from medsynth_core.viz import save_grid

    s = diffusion.sampler(steps)
    z = model.encode(x)
    rec = s.decode(model.eps_fn(z), s.encode(model.eps_fn(z), x))
    g = torch.Generator(device="cpu").manual_seed(seed)
    rnd = s.decode(model.eps_fn(z), torch.randn(x.shape, generator=g).to(x))
    rows = [list(x[:, 0].cpu()), list(rec[:, 0].cpu()), list(rnd[:, 0].cpu())]
    save_grid(path, rows, value_range=(-1.0, 1.0), row_titles=["input", "recon x_T", "random x_T"])


@torch.no_grad()
def validate(
    model: DiffAE, diffusion: GaussianDiffusion, x: torch.Tensor, steps: int, chunk: int = 64
) -> float:
    """Reconstruction PSNR (dB, images in [0, 1], one MSE pooled over all slices) of ``x`` ((B,1,H,W) in
    [-1, 1]) through z_sem and the inferred x_T (DDIM ``steps``). Deterministic and draws no random numbers,
    so validating never changes the training run."""
    s = diffusion.sampler(steps)
    was_training = model.training
    model.eval()
    se = 0.0
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk]
        eps = model.eps_fn(model.encode(xb))
        rec = s.decode(eps, s.encode(eps, xb))
        se += float((((rec - xb) / 2) ** 2).double().sum())
    model.train(was_training)
    mse = se / x.numel()
    return 100.0 if mse <= 1e-10 else float(10 * math.log10(1.0 / mse))


def validation_slices(val_ds, n: int) -> torch.Tensor | None:
    """``n`` validation slices evenly spaced over the split (all when fewer), or None without a split."""
    if val_ds is None or len(val_ds) == 0:
        return None
    idx = sorted({int(round(i)) for i in torch.linspace(0, len(val_ds) - 1, min(n, len(val_ds))).tolist()})
    return torch.stack([val_ds[i] for i in idx])


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """lr of the update that completes step ``step + 1`` (0-based ``step``). ``constant`` (the fork): ``lr``.
    ``cosine`` (extension): linear warm-up over ``warmup_steps``, then ``lr·(1 + cos(π·p))/2`` with ``p`` the
    fraction of the post-warm-up steps done, so a short CPU run ends at a small lr (the EMA then averages a
    nearly converged model)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return cfg.lr * warm
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * frac))


def _keyed_draws(x: torch.Tensor, step: int, seed: int, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``run.deterministic``: the level and the noise of each sample from a generator keyed by (seed,
    step, its position in the global batch), independent of how the global batch is split over ranks."""
    ts, noises = [], []
    for pos in T.global_positions(x.shape[0]):
        with T.keyed_rng(seed, step, pos):
            ts.append(torch.randint(0, levels, (1,)))
            noises.append(torch.randn((1, *x.shape[1:]), dtype=x.dtype))
    return torch.cat(ts).to(x.device), torch.cat(noises).to(x.device)


def train(
    cfg: Config, resume: str | Path | None = None, until: int | None = None, report: dict | None = None
) -> Path:
    """Run (or continue) training; returns the run directory. ``until`` stops (and checkpoints) after that
    many steps of the ``train.steps`` run, keeping its lr schedule, so a later call resumes it exactly.
    SIGTERM (cluster preemption) checkpoints the step in progress and leaves on every rank; ``report``
    (when given) receives ``start``, ``step`` and ``preempted`` (the signal's name, or None)."""
    T.set_num_threads(cfg.run.threads)
    with D.distributed_session(cfg.run.device) as info:
        D.seed_everything(cfg.run.seed)
        run = T.RunDir.create(cfg.run.root, KIND, cfg.run.name)
        if info.is_main:
            save_config(cfg, run.config)
        train_ds, val_ds = build_datasets(cfg)
        model = DiffAE(cfg.model).to(info.device)
        T.to_channels_last(model, T.channels_last_enabled(cfg.run.channels_last, info.device))  # issue 19
        ema = T.EMA(model, cfg.train.ema_decay)
        net = D.wrap_ddp(model, info)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
        scaler = T.grad_scaler(info.device, enabled=cfg.train.fp16)  # a no-op on CPU / when fp16 is off
        diffusion = GaussianDiffusion(cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        state = {"models": {"model": model}, "optimizers": {"opt": opt}, "emas": {"ema": ema}, "scaler": scaler}
        step, _ = mgr.resume(resume, KIND, **state)
        loader = T.ResumableLoader(
            train_ds, cfg.train.batch_size, seed=cfg.run.seed, num_workers=cfg.train.num_workers
        )
        preview = val_ds if val_ds is not None and len(val_ds) else train_ds
        preview_x = torch.stack([preview[i] for i in range(min(6, len(preview)))]).to(info.device)
        val_x = validation_slices(val_ds, cfg.train.val_samples)
        val_x = val_x.to(info.device) if val_x is not None else None
        val_steps = cfg.train.val_steps or cfg.diffusion.eval_steps
        best_file = run.checkpoints / "best.json"  # {step, val_psnr} of checkpoints/best.pt (survives resume)
        best = (
            json.loads(best_file.read_text())["val_psnr"] if best_file.is_file() and step > 0 else -math.inf
        )

        save = mgr.saver(KIND, main=info.is_main, config=config_to_dict(cfg), **state)

        start, preempted = step, None
        with T.RunLogger(run, resume_step=step) as logger, T.PreemptionGuard() as stop:
            model.train()
            end = cfg.train.steps if until is None else max(step, min(int(until), cfg.train.steps))
            for s, x in T.progress(
                loader.iterate(step, end), total=cfg.train.steps, initial=step, desc="mgdcr train"
            ):
                x = x.to(info.device)
                for group in opt.param_groups:
                    group["lr"] = learning_rate(s, cfg.train)
                if not torch.isfinite(x).all():
                    raise ValueError(f"non-finite training batch at step {s}")
                if cfg.run.deterministic:
                    t, noise = _keyed_draws(x, s, cfg.run.seed, diffusion.T)
                else:
                    t = torch.randint(0, diffusion.T, (x.shape[0],), device=info.device)
                    noise = torch.randn_like(x)
                with T.autocast(info.device, enabled=cfg.train.fp16):
                    loss = diffusion.loss(net, x, t, noise)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                gnorm = T.clip_gradients(model.parameters(), cfg.train.grad_clip)
                scaler.step(opt)
                scaler.update()
                ema.update(model)
                done = s + 1
                if T.due(done, cfg.train.log_every, cfg.train.steps):
                    stats = D.all_reduce_dict({"loss": float(loss.detach()), "grad_norm": gnorm})
                    logger.log(done, stats)
                if info.is_main and T.due(done, cfg.train.sample_every, cfg.train.steps):
                    save_samples(
                        run.images / f"samples_{done:08d}.png",
                        ema.module,
                        diffusion,
                        preview_x,
                        cfg.diffusion.eval_steps,
                        cfg.run.seed,
                    )
                if info.is_main and val_x is not None and T.due(done, cfg.train.val_every, cfg.train.steps):
                    v = validate(ema.module, diffusion, val_x, val_steps)
                    logger.log(done, {"psnr_recon_db": v}, prefix="val")
                    if v > best:  # keep the best EMA weights by validation reconstruction PSNR
                        best = v
                        save(done, name="best.pt")
                        best_file.write_text(json.dumps({"step": done, "val_psnr": v}))
                saved = T.due(done, cfg.train.ckpt_every, cfg.train.steps) or done == end
                if saved:
                    save(done)
                if stop.should_stop():  # SIGTERM: checkpoint this step, leave on every rank (issue 18)
                    if not saved:
                        save(done)
                    preempted, end = stop.signal_name, done
                    break
        D.barrier()
    if report is not None:
        report.update(start=int(start), step=int(end), preempted=preempted)
    return run.path


# ------------------------------------------------------------------------------------------------------------
# optional latent DDIM on z_sem (spec §1.4)
class _ZDataset(torch.utils.data.Dataset):
    def __init__(self, z: torch.Tensor):
        self.z = z

    def __len__(self) -> int:
        return self.z.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.z[i]


def _latent_net(cfg: Config, z_channels: int):
    from .model import LatentMLP

    lc = cfg.latent
    return LatentMLP(z_channels, lc.num_layers, lc.hidden, lc.time_channels, lc.condition_bias, lc.dropout)


def train_latent(cfg: Config, resume: str | Path | None = None) -> Path:
    """Train the latent DDIM on z_sem of the frozen EMA prior ``cfg.latent.prior`` (ε-prediction, L1 loss,
    constant β = 0.008, AdamW); z_sem is z-normalised with statistics of an inference pass over the data."""
    from dataclasses import replace

    from medsynth_core.cli import UserError

    lc = cfg.latent
    if not lc.prior:
        raise UserError("latent.prior is empty: set latent.prior=/path/to/trained_prior.pt")
    T.set_num_threads(cfg.run.threads)
    with D.distributed_session(cfg.run.device) as info:
        D.seed_everything(cfg.run.seed)
        run = T.RunDir.create(cfg.run.root, KIND, cfg.run.name + "-latent")
        prior, pcfg = load_prior(lc.prior, info.device)
        train_ds, _ = build_datasets(replace(cfg, model=pcfg.model))
        with torch.no_grad():
            zs = torch.cat(
                [
                    prior.encode(
                        torch.stack([train_ds[j] for j in range(i, min(i + 64, len(train_ds)))]).to(
                            info.device
                        )
                    )
                    for i in range(0, len(train_ds), 64)
                ]
            ).cpu()
        mean = zs.mean(0) if lc.znormalize else torch.zeros(zs.shape[1])
        std = zs.std(0).clamp_min(1e-8) if lc.znormalize else torch.ones(zs.shape[1])
        data = _ZDataset((zs - mean) / std)
        net = _latent_net(cfg, zs.shape[1]).to(info.device)
        T.to_channels_last(net, T.channels_last_enabled(cfg.run.channels_last, info.device))  # issue 19
        ema = T.EMA(net, lc.ema_decay)
        ddp = D.wrap_ddp(net, info)
        opt = torch.optim.AdamW(net.parameters(), lr=lc.lr, weight_decay=lc.weight_decay)
        diffusion = GaussianDiffusion(cfg.diffusion.T, const_beta=lc.beta)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        state = {"models": {"latent": net}, "optimizers": {"opt": opt}, "emas": {"latent": ema}}
        step, _ = mgr.resume(resume, KIND, **state)
        loader = T.ResumableLoader(data, min(lc.batch_size, len(data)), seed=cfg.run.seed)
        extra = {"z_mean": mean, "z_std": std, "prior": str(lc.prior)}

        save = mgr.saver(KIND, main=info.is_main, config=config_to_dict(cfg), extra=extra, **state)

        with T.RunLogger(run) as logger:
            for s, z in T.progress(
                loader.iterate(step, lc.steps), total=lc.steps, initial=step, desc="mgdcr latent"
            ):
                z = z.to(info.device)
                t = torch.randint(0, diffusion.T, (z.shape[0],), device=info.device)
                noise = torch.randn_like(z)
                err = ddp(diffusion.q_sample(z, t, noise), t) - noise
                loss = err.abs().mean() if lc.loss == "l1" else (err**2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                ema.update(net)
                done = s + 1
                if T.due(done, cfg.train.log_every, lc.steps):
                    logger.log(done, D.all_reduce_dict({"latent_loss": float(loss.detach())}))
                if T.due(done, lc.ckpt_every, lc.steps):
                    save(done)
        D.barrier()
    return run.path


@torch.no_grad()
def sample_unconditional(
    latent_ckpt: str | Path,
    n: int,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Unconditional images: z_sem from the latent DDIM (EMA), x_T ~ N(0, I), both decoded with DDIM."""
    from medsynth_core.config import config_from_dict

    ckpt = C.load_checkpoint(latent_ckpt, kind=KIND)
    if "latent" not in (ckpt.get("emas") or {}):
        raise ValueError(f"{latent_ckpt}: not a latent-DDIM checkpoint (train it with latent.enabled=true)")
    cfg = config_from_dict(Config, ckpt["config"], source=str(latent_ckpt))
    prior, pcfg = load_prior(ckpt["extra"]["prior"], device)
    net = _latent_net(cfg, pcfg.model.z_channels)
    C.load_module_state(net, ckpt["emas"]["latent"]["module"], source=f"{latent_ckpt} [latent ema]")
    net = net.to(device).eval()
    g = torch.Generator().manual_seed(seed)
    steps = steps or cfg.latent.eval_steps
    lat = GaussianDiffusion(cfg.diffusion.T, const_beta=cfg.latent.beta).sampler(steps)
    zn = lat.decode(net, torch.randn(n, pcfg.model.z_channels, generator=g).to(device), clip=False)
    z = zn * ckpt["extra"]["z_std"].to(device) + ckpt["extra"]["z_mean"].to(device)
    s = pcfg.model.image_size
    img = GaussianDiffusion(pcfg.diffusion.T, pcfg.diffusion.beta_start, pcfg.diffusion.beta_end).sampler(
        pcfg.diffusion.eval_steps
    )
    x_t = torch.randn(n, pcfg.model.in_channels, s, s, generator=g).to(device)
    return img.decode(prior.eps_fn(z), x_t)

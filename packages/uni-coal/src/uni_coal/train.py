"""Training loop (spec §4): per iteration one D step (fresh G forward, fake detached, R1 every step) then one
G step (second G forward with the same z, c, delta); Adam (0, 0.99); EMA of G; blur warm-up.

Multi-process: gradients are all-reduced by hand (as StyleGAN does) because DDP does not support the
``torch.autograd.grad(create_graph=True)`` of R1; models start identical (same init seed on every rank).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from medsynth_core import checkpoint as C
from medsynth_core import distributed as Dist
from medsynth_core import training as T
from medsynth_core.cli import UserError
from medsynth_core.config import config_to_dict, save_config
from medsynth_core.viz import save_grid

from . import losses as L
from .config import Config
from .data import SliceDataset, build_volumes
from .discriminator import CoModDiscriminator
from .encoder import ReversedEncoder
from .model import UniCOALGenerator
from .sam import SamGuidance, build_sam

KIND = "uni-coal"


def _sync_grads(module: torch.nn.Module) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    off = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[off : off + n].view_as(p.grad))
        off += n


class Trainer:
    """Holds G, D, EMA(G), optimisers and the frozen SAM; ``step(batch, step)`` does one iteration."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device | str = "cpu",
        sam: SamGuidance | None = None,
        world_size: int = 1,
    ):
        self.cfg, self.device, self.world = cfg, torch.device(device), world_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
            self.G = UniCOALGenerator(cfg.generator).to(self.device).train()
            self.D = CoModDiscriminator(cfg.discriminator).to(self.device).train()
        cl = T.channels_last_enabled(cfg.run.channels_last, self.device)  # issue 19 (auto: CUDA only)
        for net in (self.G, self.D):
            T.to_channels_last(net, cl)
        self.ema = T.EMA(
            self.G, decay=L.ema_beta(cfg.train.batch_size * world_size, cfg.optim.ema_half_life_images)
        )
        o = cfg.optim
        betas = (float(o.betas[0]), float(o.betas[1]))  # Q1: floats
        self.opt_G = torch.optim.Adam(self.G.parameters(), lr=o.lr_g, betas=betas, eps=o.eps)
        self.opt_D = torch.optim.Adam(self.D.parameters(), lr=o.lr_d, betas=betas, eps=o.eps)
        if sam is None and cfg.loss.lambda_sam > 0:
            sam = build_sam(cfg.sam)
        self.sam = sam.to(self.device) if sam is not None else None

    # ----------------------------------------------------------------------------------------------
    def set_epoch_lr(self, epoch: int) -> float:
        o = self.cfg.optim
        f = L.lr_factor(epoch, o.lr_policy, o.n_epochs, o.n_epochs_decay)
        for g in self.opt_G.param_groups:
            g["lr"] = o.lr_g * f
        for g in self.opt_D.param_groups:
            g["lr"] = o.lr_d * f
        return f

    def _keyed(self, step: int, draw: int, shape: tuple[int, ...], n: int, bernoulli: float | None = None):
        """``run.deterministic``: ``n`` per-sample draws keyed by (seed, step, global position, draw)."""
        out = []
        for pos in T.global_positions(n):
            with T.keyed_rng(self.cfg.run.seed, step, pos, draw):
                out.append(
                    torch.randn(shape) if bernoulli is None else (torch.rand(shape) >= bernoulli).float()
                )
        return torch.stack(out)

    def _dropout_draws(self, step: int, draw: int) -> None:
        """Keyed dropout masks of the global code for the next G forward (official: ``nn.Dropout``'s own)."""
        if not self.cfg.run.deterministic:
            return
        p = self.cfg.generator.enc_dropout
        for m in self.G.modules():
            if isinstance(m, ReversedEncoder):
                m.keep_mask = lambda g: self._keyed(step, draw, tuple(g.shape[1:]), g.shape[0], p).to(g)

    def step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        cfg = self.cfg
        a = batch["A"].to(self.device)
        b = batch["B"].to(self.device)
        c = batch["c"].to(self.device)
        idx = batch["delta"].to(self.device)
        n = a.shape[0]
        n_img = step * n * self.world
        sigma = L.blur_sigma(n_img, cfg.loss.blur_init_sigma, cfg.loss.blur_fade_images)
        if cfg.run.deterministic:
            z = self._keyed(step, 0, (cfg.generator.z_dim,), n).to(self.device)
        else:
            z = torch.randn([n, cfg.generator.z_dim], device=self.device)
        real_ab = torch.cat([a, b], 1)

        # D step: fresh G forward (fake detached)
        self.D.requires_grad_(True)
        self.opt_D.zero_grad(set_to_none=True)
        self._dropout_draws(step, 1)
        with torch.no_grad():
            fake = self.G(z, c, idx, a, update_emas=True)
        ld = L.d_loss(self.D, real_ab, torch.cat([a, fake], 1), c, idx, sigma, cfg.loss.lambda_r1)
        ld["D"].backward()
        _sync_grads(self.D)
        if cfg.train.nan_to_num:
            L.nan_to_num_grads(self.D.parameters())
        self.opt_D.step()

        # G step: second forward with the same z, c, delta
        self.D.requires_grad_(False)
        self.opt_G.zero_grad(set_to_none=True)
        self._dropout_draws(step, 2)
        fake = self.G(z, c, idx, a)
        lg = L.g_loss(self.D, a, b, fake, c, idx, sigma, cfg.loss.lambda_l1, cfg.loss.lambda_sam, self.sam)
        lg["G"].backward()
        _sync_grads(self.G)
        if cfg.train.nan_to_num:
            L.nan_to_num_grads(self.G.parameters())
        self.opt_G.step()
        self.D.requires_grad_(True)
        self.ema.update(self.G)
        out = {k: float(v.detach()) for k, v in {**ld, **lg}.items()}
        out["blur_sigma"] = sigma
        return out

    # ----------------------------------------------------------------------------------------------
    def state(self, step: int, epoch: int) -> dict[str, Any]:
        return C.build_checkpoint(
            kind=KIND,
            step=step,
            epoch=epoch,
            models={"G": self.G, "D": self.D, "G_ema": self.ema.module},
            optimizers={"G": self.opt_G, "D": self.opt_D},
            emas={"G": self.ema},
            config=config_to_dict(self.cfg),
        )

    def restore(self, ckpt: dict[str, Any], source: str) -> tuple[int, int]:
        return C.restore_checkpoint(
            ckpt,
            models={"G": self.G, "D": self.D},
            optimizers={"G": self.opt_G, "D": self.opt_D},
            emas={"G": self.ema},
            source=source,
        )

    @torch.no_grad()
    def sample_grid(self, batch: dict[str, torch.Tensor], path: Path, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        a, b = batch["A"][:4], batch["B"][:4]
        z = torch.randn([a.shape[0], self.cfg.generator.z_dim], generator=g).to(self.device)
        fake = self.ema.module(
            z, batch["c"][:4].to(self.device), batch["delta"][:4].to(self.device), a.to(self.device)
        ).cpu()
        imgs, titles = [], []
        for i in range(a.shape[0]):
            imgs += [a[i, 1], fake[i, 0], b[i, 0]]
            titles += ["input ch1", "synth", "target"]
        save_grid(path, imgs, titles=titles, ncols=3, value_range=(-1, 1))


def _check_sam_policy(cfg: Config) -> None:
    """Real-data training refuses to start without SAM weights unless told (spec §3)."""
    if cfg.loss.lambda_sam > 0 and cfg.data.kind != "phantom":
        ck = Path(cfg.sam.checkpoint) if cfg.sam.checkpoint else None
        if (ck is None or not ck.is_file()) and not cfg.sam.allow_random:
            raise UserError(
                f"SAM weights not found at '{cfg.sam.checkpoint}': set sam.checkpoint to "
                "sam_vit_b_01ec64.pth, or loss.lambda_sam=0 to train without SAM guidance"
            )


def train(
    cfg: Config,
    resume: str | None = None,
    run_dir: str | Path | None = None,
    max_steps: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train (single process or torchrun). Resumes from the run directory's latest checkpoint. SIGTERM
    (cluster preemption) checkpoints the step in progress and returns with ``preempted`` set (issue 18)."""
    _check_sam_policy(cfg)
    T.set_num_threads(cfg.run.threads)
    with Dist.distributed_session(cfg.run.device) as info:
        Dist.seed_everything(cfg.run.seed)
        mb = cfg.discriminator.mbstd_group
        if cfg.run.deterministic and cfg.discriminator.mbstd_channels > 0 and cfg.train.batch_size % mb:
            raise UserError(
                f"run.deterministic: discriminator.mbstd_group={mb} must divide the per-process "
                f"train.batch_size={cfg.train.batch_size} (minibatch-std groups are formed within a process, "
                "so larger groups make N processes differ from one); set discriminator.mbstd_group"
            )
        run = (
            T.RunDir.create(Path(run_dir).parent, "", Path(run_dir).name)
            if run_dir is not None
            else T.RunDir.create(cfg.run.root, KIND, cfg.run.name)
        )
        if info.is_main:
            run.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run.config)
        volumes = build_volumes(cfg.data, "train", seed=cfg.run.seed)
        ds = SliceDataset(volumes, cfg.data, seed=cfg.run.seed)
        loader = T.ResumableLoader(
            ds,
            cfg.train.batch_size,
            seed=cfg.run.seed,
            drop_last=cfg.train.drop_last,
            num_workers=cfg.train.num_workers,
        )
        trainer = Trainer(cfg, info.device, world_size=info.world_size)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        step = 0
        ck_path = mgr.resume_source(resume)
        if ck_path is not None:
            step, _ = trainer.restore(C.load_checkpoint(ck_path, kind=KIND), str(ck_path))
        total = max_steps or cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
        last: dict[str, float] = {}
        t0 = time.time()
        start, end, preempted = step, total, None
        with T.RunLogger(run, enabled=info.is_main, resume_step=step) as logger, T.PreemptionGuard() as stop:
            it = loader.iterate(step, total)
            if not quiet:
                it = T.progress(it, total=total, initial=step, desc="uni-coal")
            for s, batch in it:
                trainer.set_epoch_lr(s // loader.steps_per_epoch)
                last = trainer.step(batch, s)
                done = s + 1
                if not all(math.isfinite(v) for v in last.values()):
                    raise RuntimeError(f"step {s}: non-finite loss {last}")
                if info.is_main and T.due(done, cfg.train.log_every, total):
                    logger.log(done, last)
                if info.is_main and T.due(done, cfg.train.sample_every, total):
                    trainer.sample_grid(batch, run.images / f"sample_{done:08d}.png")
                saved = T.due(done, cfg.train.ckpt_every, total)
                if info.is_main and saved:
                    mgr.save(trainer.state(done, done // loader.steps_per_epoch))
                if stop.should_stop():  # SIGTERM (preemption): checkpoint this step, leave on every rank
                    if info.is_main and not saved:
                        mgr.save(trainer.state(done, done // loader.steps_per_epoch))
                    preempted, end = stop.signal_name, done
                    break
        Dist.barrier()
        return {
            "steps": total,
            "start": int(start),
            "step": int(end),
            "preempted": preempted,
            "last": last,
            "seconds": time.time() - t0,
            "run": str(run.path),
            "trainer": trainer,
        }

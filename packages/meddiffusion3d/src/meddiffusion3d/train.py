"""BiFlowNet training on cached latents (spec §2 "Training", §3; official ``train_BiFlowNet_SingleRes.py``).

Latents come from ``meddiffusion3d encode`` (normalised un-quantised patch latents, spec §1.4); class labels
from a manifest (CSV ``name,class`` or JSON ``{name: class}``, class as index or a :data:`CLASS_NAMES` name).
Adam 1e-4 (default betas, constant), fp16 AMP + GradScaler on CUDA with backward **outside** autocast and a
DistributedSampler-equivalent split (spec §6.9 fixes), model EMA (spec checklist 14), checkpoints through
medsynth-core (model, EMA, optimiser, scaler, RNG) that resume bit-exactly.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medsynth_core import checkpoint as C
from medsynth_core import distributed as D
from medsynth_core import training as T
from medsynth_core.cli import UserError
from medsynth_core.config import config_to_dict, save_config

from . import precision as P
from .biflownet import CLASS_NAMES, resolution_code
from .config import Config, bucket_shape, build_biflownet, build_diffusion
from .diffusion import ModelEMA
from .infer import BIFLOWNET_KIND as KIND
from .infer import read_latent

log = logging.getLogger("meddiffusion3d")
PACKAGE = "meddiffusion3d"


def parse_class(value: str | int, n_classes: int, source: str = "class") -> int:
    """A class index, or one of :data:`CLASS_NAMES` (paper classes), checked against ``n_classes``."""
    s = str(value).strip()
    if s.lstrip("-").isdigit():
        c = int(s)
    else:
        names = {n.lower(): i for i, n in enumerate(CLASS_NAMES)}
        if s.lower() not in names:
            raise UserError(f"{source}: unknown class {s!r}; use an index or one of {list(CLASS_NAMES)}")
        c = names[s.lower()]
    if not 0 <= c < n_classes:
        raise UserError(f"{source}: class {c} is outside [0, {n_classes}) (biflownet.classes={n_classes})")
    return c


def read_manifest(path: str | Path, n_classes: int) -> dict[str, int]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: class manifest not found (set train.manifest=...)")
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise UserError(f"{path}: JSON manifest must be an object {{name: class}}")
        items = list(raw.items())
    else:
        with path.open(newline="") as fh:
            rows = [r for r in csv.reader(fh) if r and not r[0].startswith("#")]
        if rows and rows[0][0].strip().lower() in ("name", "file", "case"):
            rows = rows[1:]
        bad = [r for r in rows if len(r) < 2]
        if bad:
            raise UserError(f"{path}: every CSV row needs 'name,class', got {bad[0]}")
        items = [(r[0].strip(), r[1]) for r in rows]
    out = {}
    for name, c in items:
        stem = Path(str(name)).name.split(".")[0]
        out[stem] = parse_class(c, n_classes, f"{path} [{name}]")
    return out


class LatentDataset(Dataset):
    """``(latent (C, d, h, w), class)`` pairs from ``*.latent.pt`` files. Latents of several grids form one
    resolution bucket each (``shapes[i]``); :func:`train` then draws every batch from one bucket."""

    def __init__(self, folder: str | Path | None, manifest: str | Path | None, n_classes: int, channels: int):
        if not folder:
            raise UserError("train.latents is not set: encode a dataset with `meddiffusion3d encode` first")
        folder = Path(folder)
        self.files = sorted(folder.glob("*.latent.pt")) if folder.is_dir() else []
        if not self.files:
            raise UserError(f"{folder}: no *.latent.pt files (write them with `meddiffusion3d encode`)")
        if manifest:
            classes = read_manifest(manifest, n_classes)
        elif n_classes == 1:
            classes = {}
        else:
            raise UserError("train.manifest is not set: give a CSV name,class or JSON {name: class}")
        self.labels, self.shapes, norms = [], [], set()
        for f in self.files:
            name = f.name.removesuffix(".latent.pt")
            if manifest and name not in classes:
                raise UserError(f"{manifest}: no class for latent {f.name} (add a row '{name},<class>')")
            self.labels.append(classes.get(name, 0))
        first = read_latent(self.files[0])
        for f in self.files:
            d = read_latent(f)
            if d["latent"].shape[0] != channels:
                raise UserError(
                    f"{f}: the latent has {d['latent'].shape[0]} channels but biflownet.channels={channels}"
                )
            self.shapes.append(tuple(int(n) for n in d["latent"].shape[1:]))
            norms.add(tuple(float(v) for v in d["norm"]))
        counts = {sh: self.shapes.count(sh) for sh in self.shapes}
        self.grids = sorted(counts, key=lambda sh: (-counts[sh], sh))  # most frequent first
        self.shape = (channels, *self.grids[0])
        if len(norms) != 1:
            raise UserError(
                f"{folder}: latents were normalised with different codebook stats {sorted(norms)}"
            )
        self.norm = list(norms.pop())
        self.downsample = int(first["downsample"])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        z = read_latent(self.files[i])["latent"].float()
        return z, torch.tensor(self.labels[i], dtype=torch.long)


def run_dir(cfg: Config, sub: str = "biflownet") -> T.RunDir:
    return T.RunDir.create(cfg.run.root, PACKAGE, f"{cfg.run.name}/{sub}")


def latest_checkpoint(cfg: Config, sub: str = "biflownet") -> Path | None:
    return C.CheckpointManager(Path(cfg.run.root) / PACKAGE / cfg.run.name / sub / "checkpoints").latest()


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Per-(step, rank) noise/timestep generator: resume-exact and distinct across ranks."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 7919 + rank) % (2**63))


def sample_generators(seed: int, step: int, local_batch: int, device: torch.device) -> list[torch.Generator]:
    """``run.deterministic``: one generator per sample keyed by (seed, step, global position), the same for
    that sample however the global batch is split over ranks (core ``global_positions``)."""
    out = []
    for pos in T.global_positions(local_batch):
        key = np.random.SeedSequence([seed, step, pos]).generate_state(2, dtype=np.uint32)
        out.append(torch.Generator(device=device).manual_seed((int(key[0]) << 32 | int(key[1])) % (2**63)))
    return out


def draw_generators(cfg, step: int, local_batch: int, rank: int, device: torch.device):
    """The generator(s) of one training step: per sample (``run.deterministic``) or per (step, rank)."""
    if cfg.run.deterministic:
        return sample_generators(cfg.run.seed, step, local_batch, device)
    return step_generator(cfg.run.seed, step, rank, device)


@torch.no_grad()
def save_denoise_preview(path: Path, model: torch.nn.Module, diff, z0: torch.Tensor, y: torch.Tensor,
                         hint: torch.Tensor | None = None, seed: int = 0) -> Path:
    """PNG preview of a diffusion training run (issue 17: every loop writes previews): orthogonal views of
    latent channel 0 of the batch's first sample, clean (z0), noised to t = T/2 with a fixed ε (x_t), and the
    x̂0 the network predicts from it in one step (plus the hint's channel 0 for ControlNet). The network runs
    in eval mode and draws from its own generator, so training and resume are untouched."""
    from medsynth_core.viz import save_volume_views

    was_training = model.training
    model.eval()
    z = z0[:1].float()
    t = torch.full((1,), diff.num_timesteps // 2, dtype=torch.long, device=z.device)
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed)).to(z.device)
    x_t = diff.q_sample(z, t, eps)
    kw = {"y": y[:1], "res": resolution_code(z.shape[2:], 1, device=z.device)}
    if hint is not None:
        kw["hint"] = hint[:1]
    x0_hat = diff.predict_start_from_noise(x_t, t, model(x_t, t, **kw).float())
    model.train(was_training)
    vols = [z, x_t, x0_hat] + ([hint[:1].float()] if hint is not None else [])
    titles = ["z0", f"x_t (t={int(t)})", "x0_hat (one step)"] + (["hint"] if hint is not None else [])
    return save_volume_views(path, [v[0, 0].detach().cpu() for v in vols], titles=titles)


def _bucket_batches(tc, grids: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], int]:
    """Per-process batch of every latent grid: ``train.bucket_batch["DxHxW"]``, else ``train.batch_size``."""
    given = {bucket_shape(k): int(v) for k, v in tc.bucket_batch.items()}
    unknown = sorted(set(given) - set(grids))
    if unknown:
        raise UserError(
            f"train.bucket_batch names latent grids {unknown} that no latent has (found {sorted(grids)})"
        )
    return {g: given.get(g, tc.batch_size) for g in grids}


def train(cfg: Config, resume: str | Path | None = None) -> dict:
    """Train BiFlowNet on ``cfg.train.latents``; returns ``run_dir``, ``start``, ``step`` and ``preempted`` (the
    signal's name when SIGTERM stopped it after checkpointing that step, else None)."""
    tc, dc = cfg.train, cfg.diffusion
    T.set_num_threads(cfg.run.threads)
    with D.distributed_session(cfg.run.device) as info:
        D.seed_everything(cfg.run.seed)
        ds = LatentDataset(tc.latents, tc.manifest, cfg.biflownet.classes, cfg.biflownet.channels)
        device = info.device
        if device.type == "cuda":  # TF32 matmuls/convs as in the official script (spec §2 "Training")
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        model = build_biflownet(cfg.biflownet).to(device)
        T.to_channels_last(model, T.channels_last_enabled(cfg.run.channels_last, device))  # issue 19
        for grid in ds.grids:
            try:
                model.check_input(torch.empty(1, cfg.biflownet.channels, *grid, device="meta"))
            except ValueError as exc:
                raise UserError(f"{tc.latents}: latents of shape {grid}: {exc}") from exc
        loader_of = _bucket_batches(tc, ds.grids)
        diff = build_diffusion(cfg).to(device)
        ema = ModelEMA(model, decay=dc.ema, update_every=dc.ema_every, start_step=dc.ema_start)
        opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
        scaler = P.grad_scaler(device, tc.amp)
        run = run_dir(cfg)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        state = {"models": {"model": model}, "optimizers": {"opt": opt}, "emas": {"ema": ema}, "scaler": scaler}
        start, _ = mgr.resume(resume, KIND, map_location=device, **state)
        ddp = D.wrap_ddp(model, info)
        # the loader shards every global batch over the ranks (spec §6.9: no rank walks all the data); several
        # latent grids: one resolution bucket per batch, all ranks on the same bucket at each step (spec §2)
        if len(ds.grids) == 1:
            loader = T.ResumableLoader(ds, tc.batch_size, seed=cfg.run.seed, num_workers=tc.num_workers)
        else:
            loader = T.BucketLoader(ds, ds.shapes, loader_of, seed=cfg.run.seed, num_workers=tc.num_workers)
            log.info("resolution buckets (latent grid: batch per process): %s", loader_of)
        ckpt_cfg = config_to_dict(cfg)
        if info.is_main:
            save_config(cfg, run.config)  # the resolved config beside the checkpoints
        extra = {
            "latent_norm": ds.norm,
            "latent_shape": list(ds.shape),
            "latent_grids": [list(g) for g in ds.grids],
            "downsample": ds.downsample,
            "autoencoder": tc.autoencoder,
        }

        save = mgr.saver(KIND, main=info.is_main, config=ckpt_cfg, extra=extra, **state)

        model.train()
        preempted, end = None, tc.steps
        with T.RunLogger(run, resume_step=start) as logger, T.PreemptionGuard() as stop:
            bar = T.progress(loader.iterate(start, tc.steps), total=tc.steps, initial=start, desc="biflownet")
            for step, (z, y) in bar:
                z, y = z.to(device, non_blocking=True), y.to(device, non_blocking=True)
                g = draw_generators(cfg, step, z.shape[0], info.rank, device)
                opt.zero_grad(set_to_none=True)
                with P.autocast(device, tc.amp):
                    loss = diff.training_loss(
                        ddp, z, y=y, res=resolution_code(z.shape[2:], z.shape[0], device=device), generator=g
                    )
                scaler.scale(loss.float()).backward()  # outside autocast (spec §6.9)
                scaler.step(opt)
                scaler.update()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"biflownet step {step}: loss is {float(loss)}")
                ema.step(model, step + 1)
                if T.due(step + 1, tc.log_every, tc.steps):
                    logger.log(
                        step + 1, D.all_reduce_dict({"loss": float(loss.detach())}), prefix="biflownet"
                    )
                if info.is_main and T.due(step + 1, tc.sample_every, tc.steps):
                    save_denoise_preview(run.images / f"step_{step + 1:08d}.png", model, diff, z, y, seed=cfg.run.seed)
                if stop.checkpoint_step(step + 1, tc.ckpt_every, tc.steps, save):  # SIGTERM: this step saved, leave
                    preempted, end = stop.signal_name, step + 1
                    break
        D.barrier()
    return {"run_dir": str(run.path), "start": int(start), "step": int(end), "preempted": preempted}

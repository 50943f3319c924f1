"""ControlNet fine-tuning for degraded-input restoration and restoration itself (spec §4).

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
from medsynth_core.config import config_from_dict, config_to_dict, save_config

from .biflownet import resolution_code
from .config import Config, build_diffusion
from .controlnet import ControlledBiFlowNet, ControlNet, make_hint
from .data import VolumeSource, WholeVolumeDataset
from .degrade import degrade
from .encode import patch_encode
from .generate import Generator
from .train import PACKAGE, draw_generators

KIND = "meddiffusion3d-controlnet"


def task_kwargs(params: dict) -> dict:
    """YAML task parameters are floats; integral values become ints (factor, n_views, seed, axis)."""
    return {k: int(v) if float(v).is_integer() else float(v) for k, v in params.items()}


def check_task_params(task: str, params: dict) -> dict:
    """``controlnet.task_params`` as keyword arguments of the task's degradation; unknown keys are errors."""
    import inspect

    from . import degrade as G

    fn = {
        "thick_slice": G.thick_slice,
        "sparse_view_ct": G.sparse_view_ct,
        "limited_angle_ct": G.sparse_view_ct,
        "kspace": G.kspace_undersample,
    }[task]
    allowed = [p for p in inspect.signature(fn).parameters if p != "vol"]
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise UserError(
            f"controlnet.task_params has {bad}, which task {task!r} does not take (it takes {allowed}); "
            "overrides merge into the config's mapping, so set the whole mapping in a config file"
        )
    return task_kwargs(params)


def simulate(x: torch.Tensor, cfg: Config) -> torch.Tensor:
    cc = cfg.controlnet
    return degrade(x, cc.task, **check_task_params(cc.task, cc.task_params))


class _Encoder:
    """Normalised patch encoding with the frozen AE (the v1 hint and the training target z0)."""

    def __init__(self, gen: Generator):
        self.ae, self.norm, self.patch, self.chunk = (
            gen.ae,
            gen.norm,
            gen.ae_cfg.data.patch,
            gen.ae_cfg.infer.chunk,
        )

    @torch.no_grad()
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        try:
            return self.norm.norm(patch_encode(self.ae, v, self.patch, quantize=False, chunk=self.chunk))
        except ValueError as exc:
            raise UserError(str(exc)) from exc


@torch.no_grad()
def encode_pair(x: torch.Tensor, cfg: Config, enc: _Encoder, step: int | str = "cache"):
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


def cached_pairs(ds, cfg: Config, enc: _Encoder, device) -> _PairCache:
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
    T.set_num_threads(cfg.train.threads or cfg.run.threads)
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
        diff = build_diffusion(cfg).to(device)
        opt = torch.optim.Adam(m.trainable_parameters(), lr=cc.lr)
        enc = _Encoder(gen)
        run = run_dir(cfg)
        mgr = C.CheckpointManager(run.checkpoints, keep_last=cfg.run.keep_last)
        start, _ = mgr.resume(
            resume, KIND, map_location=device, models={"controlnet": m.controlnet}, optimizers={"opt": opt}
        )
        ddp = D.wrap_ddp(m, info)
        if cc.cache_latents:
            ds = cached_pairs(ds, cfg, enc, device)
        loader = T.ResumableLoader(ds, cc.batch, seed=cfg.run.seed, num_workers=cfg.data.num_workers)
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
                if stop.checkpoint_step(step + 1, cc.ckpt_every, cc.steps, save):  # SIGTERM: this step saved, leave
                    preempted, end = stop.signal_name, step + 1
                    break
        D.barrier()
    return {"run_dir": str(run.path), "start": int(start), "step": int(end), "preempted": preempted}


class Restorer:
    """Frozen base + trained ControlNet + autoencoder: degraded volume → restored volume."""

    def __init__(
        self,
        checkpoint: str | Path,
        base: str | Path | None = None,
        autoencoder: str | Path | None = None,
        device: str = "cpu",
    ):
        ck = C.load_checkpoint(checkpoint, kind=KIND, map_location=device)
        self.cfg = config_from_dict(Config, ck.get("config") or {}, source=f"{checkpoint} [config]")
        extra = ck.get("extra") or {}
        self.gen = Generator(base or extra["base"], autoencoder or extra.get("autoencoder") or None, device)
        cc = self.cfg.controlnet
        net = ControlNet.from_base(self.gen.model, cc.hint_channels, cc.variant)
        C.load_module_state(net, ck["models"]["controlnet"], source=f"{checkpoint} [controlnet]")
        self.model = (
            ControlledBiFlowNet(self.gen.model, net, control_scales=cc.control_scales).to(device).eval()
        )
        self.enc = _Encoder(self.gen)

    @torch.no_grad()
    def restore(
        self,
        degraded: torch.Tensor,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        show_progress: bool = True,
    ) -> torch.Tensor:
        """(1, 1, D, H, W) degraded volume in [-1, 1] → restored volume (1, 1, D, H, W) in [-1, 1]."""
        if degraded.ndim != 5 or degraded.shape[:2] != (1, 1):
            raise UserError(
                f"restore expects one 1-channel volume (1, 1, D, H, W), got {tuple(degraded.shape)}"
            )
        lat = tuple(s // self.gen.ae.downsample for s in degraded.shape[2:])
        try:
            self.gen.model.check_input(torch.empty(1, self.gen.model.channels, *lat, device="meta"))
        except ValueError as exc:
            raise UserError(f"degraded volume {tuple(degraded.shape[2:])}: {exc}") from exc
        hint = make_hint(degraded, self.cfg.controlnet.variant, lat, self.enc)
        zn = self.gen.sample_latents(
            self.cfg.controlnet.class_label,
            lat,
            1,
            seed,
            sampler,
            steps,
            denoise_fn=self.model,
            hint=hint,
            show_progress=show_progress,
        )
        return self.gen.decode(zn)


def restoration_metrics(restored: torch.Tensor, target: torch.Tensor, degraded: torch.Tensor) -> dict:
    from .evaluate import recon_metrics

    r, d = recon_metrics(target, restored), recon_metrics(target, degraded)
    return {
        "psnr": r["psnr"][0],
        "ssim": r["ssim"][0],
        "psnr_degraded": d["psnr"][0],
        "ssim_degraded": d["ssim"][0],
    }

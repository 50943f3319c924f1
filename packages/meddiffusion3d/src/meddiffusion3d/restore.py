"""Restoration with a trained ControlNet (spec §4): the degradations of each task (``simulate``), the frozen
autoencoder's normalised encoding (``LatentEncoder``: the v1 hint and the training target), and ``Restorer``
(frozen base + ControlNet + autoencoder: degraded volume → restored volume). Never imports training code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medsynth_core import checkpoint as C
from medsynth_core.cli import UserError
from medsynth_core.config import config_from_dict

from .config import Config
from .controlnet import ControlledBiFlowNet, ControlNet, make_hint
from .degrade import degrade
from .encode import patch_encode
from .generate import Generator

CONTROLNET_KIND = "meddiffusion3d-controlnet"


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


class LatentEncoder:
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


class Restorer:
    """Frozen base + trained ControlNet + autoencoder: degraded volume → restored volume."""

    def __init__(
        self,
        checkpoint: str | Path,
        base: str | Path | None = None,
        autoencoder: str | Path | None = None,
        device: str = "cpu",
    ):
        ck = C.load_checkpoint(checkpoint, kind=CONTROLNET_KIND, map_location=device)
        self.cfg = config_from_dict(Config, ck.get("config") or {}, source=f"{checkpoint} [config]")
        extra = ck.get("extra") or {}
        self.gen = Generator(base or extra["base"], autoencoder or extra.get("autoencoder") or None, device)
        cc = self.cfg.controlnet
        net = ControlNet.from_base(self.gen.model, cc.hint_channels, cc.variant)
        C.load_module_state(net, ck["models"]["controlnet"], source=f"{checkpoint} [controlnet]")
        self.model = (
            ControlledBiFlowNet(self.gen.model, net, control_scales=cc.control_scales).to(device).eval()
        )
        self.enc = LatentEncoder(self.gen)

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

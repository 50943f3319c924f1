"""``fda-vae demo``: train the demo config on the core phantom (venous → delay), checkpoint, resume once,
synthesize a NIfTI slice, evaluate, and write ``figure.png`` + ``metrics.json``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core.atomic import atomic_write_text
from medsynth_core.config import config_from_dict, load_config
from medsynth_core.viz import save_grid

from .config import Config

PACKAGE_DIR = Path(__file__).resolve().parents[2]
DEMO_YAML = PACKAGE_DIR / "configs" / "demo.yaml"

# The same settings as configs/demo.yaml (used when the package is installed without its configs folder;
# a test keeps the two identical).
DEMO_CONFIG: dict[str, Any] = {
    "name": "demo",
    "out_root": "runs",
    "device": "cpu",
    "model": {"channels": [8, 16], "num_res_blocks": 1, "latent_channels": 4, "norm_num_groups": 4},
    "disc": {"num_layers_d": 2, "channels": 8},
    "loss": {"w_perc": 0.0},
    "data": {
        "source": "phantom",
        "image_size": 32,
        "phantom_phases": ["venous", "delay"],
        "phantom_train": 16,
        "phantom_val": 4,
        "phantom_size": 64,
    },
    "train": {
        "batch_size": 2,
        "lr_g": 1.0e-3,
        "lr_d": 1.0e-4,
        "max_steps": 240,
        "ckpt_every": 120,
        "val_every": 120,
        "sample_every": 120,
        "log_every": 20,
        "threads": 1,
    },
    "eval": {"batch_size": 4},
}


def demo_config(overrides: list[str] | None = None) -> Config:
    if DEMO_YAML.is_file():
        return load_config(Config, DEMO_YAML, overrides or [])
    return load_config(Config, None, overrides or [], base=DEMO_CONFIG)


def run_demo(out: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    from medsynth_core.io import write_image

    from .data import phantom_datasets
    from .evaluate import evaluate_model
    from .infer import load_generator, synthesize_file
    from .train import train

    out = Path(out)
    run_root = out / "run"
    if run_root.exists():
        shutil.rmtree(run_root)  # a fresh run every time (our own folder)
    cfg = demo_config([f"out_root={run_root}", *(overrides or [])])
    datasets = phantom_datasets(cfg)
    half = cfg.train.max_steps // 2
    t0 = time.perf_counter()
    first = train(
        config_from_dict(Config, {**_dict(cfg), "train": {**_dict(cfg)["train"], "max_steps": half}}),
        datasets=datasets,
    )
    second = train(cfg, datasets=datasets)  # resumes from the step-`half` checkpoint
    train_s = time.perf_counter() - t0
    if second["start"] != half:
        raise RuntimeError(f"demo resume failed: started at step {second['start']}, expected {half}")
    ckpt = Path(second["checkpoint"])
    model, cfg = load_generator(ckpt)
    val = datasets[1]
    summary, _ = evaluate_model(model, val, batch_size=cfg.eval.batch_size)
    # identity baseline: the source phase itself as the prediction
    a = torch.stack([val[i]["a"] for i in range(len(val))])
    b = torch.stack([val[i]["b"] for i in range(len(val))])
    from .evaluate import slice_metrics

    base = {k: float(v.mean()) for k, v in slice_metrics(a, b).items() if k != "mse01"}
    # NIfTI round trip through the synthesize path
    nii = write_image(val.a[0, 0].T.copy(), out / "synth" / "venous_slice.nii.gz")
    synth = synthesize_file(model, cfg, nii, out / "synth" / "delay_synth.nii.gz", src="a")
    with torch.no_grad():
        a2b = model.translate(a, "a")
        b2a = model.translate(b, "b")
    rows = [
        [a[i, 0], a2b[i, 0], b[i, 0], (a2b[i, 0] - b[i, 0]).abs() - 1.0, b2a[i, 0]] for i in range(len(val))
    ]
    titles = [["venous (A)", "A->delay", "delay (B)", "|A->B - B|", "B->venous"]] + [[None] * 5] * (
        len(rows) - 1
    )
    save_grid(out / "figure.png", rows, titles=titles, value_range=(-1.0, 1.0), scale=3)
    metrics = {
        "config": "demo",
        "phases": list(cfg.data.phantom_phases),
        "train_steps": cfg.train.max_steps,
        "resumed_at": second["start"],
        "train_seconds": train_s,
        "first_half": first["val"],
        "evaluation": summary,
        "identity_baseline_a2b": base,
        "synthesized_nifti": synth["output"],
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return {
        "figure": str(out / "figure.png"),
        "metrics": str(out / "metrics.json"),
        "psnr_a2b": summary["a2b"]["deterministic"]["psnr"],
        "identity_psnr": base["psnr"],
        "train_seconds": train_s,
    }


def _dict(cfg: Config) -> dict[str, Any]:
    from medsynth_core.config import config_to_dict

    return config_to_dict(cfg)


__all__ = ["DEMO_CONFIG", "demo_config", "run_demo", "np"]

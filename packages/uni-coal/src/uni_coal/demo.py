"""``demo``: train the demo config on phantoms (half, checkpoint, resume, rest), then one CMS, one SR and one
CMSR example on a held-out phantom subject with the paper's metrics; writes figure.png and metrics.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from medsynth_core.config import bundled_configs, load_config
from medsynth_core.viz import save_grid

from .config import Config
from .data import build_volumes
from .evaluate import volume_metrics
from .infer import load_generator, synthesize_volume

DEMO_CONFIG = bundled_configs(__file__) / "demo.yaml"
EXAMPLES = (("CMS", "T1", "T2", 1), ("SR", "T2", "T2", 2), ("CMSR", "T1", "T2", 2))


def demo_config(overrides=()) -> Config:
    if DEMO_CONFIG.is_file():
        return load_config(Config, DEMO_CONFIG, list(overrides))
    raise FileNotFoundError(f"{DEMO_CONFIG}: demo config missing from the installation")


def run_demo(out: str | Path, steps: int = 20, overrides=()) -> dict[str, Any]:
    from medsynth_core.checkpoint import CheckpointManager

    from .train import train

    t0 = time.time()
    out = Path(out)
    cfg = demo_config(
        [
            *overrides,
            f"train.max_steps={steps}",
            f"train.ckpt_every={steps // 2}",
            f"train.sample_every={steps // 2}",
        ]
    )
    run_dir = out / "run"
    first = train(cfg, run_dir=run_dir, max_steps=steps // 2, quiet=True)
    resumed = train(cfg, run_dir=run_dir, max_steps=steps, quiet=True)  # resumes from step steps//2
    ckpt = CheckpointManager(run_dir / "checkpoints").latest()
    g, cfg = load_generator(ckpt)
    test = build_volumes(cfg.data, "test", seed=cfg.seed)[0]
    rows, titles, metrics = [], [], {}
    for name, src, tgt, t in EXAMPLES:
        hr_src = test[src]
        lr = hr_src[::t] if t > 1 else hr_src  # thick slices: every t-th slice (decimation, first aligned)
        pred = synthesize_volume(g, cfg, lr, tgt, thickness=t, seed=0)
        target = test[tgt].astype(np.float64)[: pred.shape[0]]
        m = volume_metrics(target, pred[: target.shape[0]])
        metrics[name] = {"source": src, "target": tgt, "thickness": t, **m}
        k = target.shape[0] // 2 + (1 if t > 1 else 0)  # an in-between slice for SR/CMSR
        src_show = lr[min(k // t, lr.shape[0] - 1)]
        rows.append([src_show, pred[k], test[tgt][k]])
        titles.append([f"{name} input {src} t={t}", f"synth PSNR {m['psnr']:.1f}", f"target {tgt}"])
    rows = [
        [np.asarray(r[0], np.float32) / 127.5 - 1, r[1], np.asarray(r[2], np.float32) / 127.5 - 1]
        for r in rows
    ]
    fig = save_grid(out / "figure.png", rows, titles=titles, value_range=(-1, 1), scale=4)
    result = {
        "steps": steps,
        "resumed_from": steps // 2,
        "first_last_losses": first["last"],
        "final_losses": resumed["last"],
        "examples": metrics,
        "seconds": time.time() - t0,
        "checkpoint": str(ckpt),
        "figure": str(fig),
        "note": "tiny phantom demo with a random SAM stand-in; numbers are not paper results",
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result

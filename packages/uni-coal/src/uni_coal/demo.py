"""``demo``: train the demo recipe (``configs/demo.yaml``) from scratch on multi-contrast brain phantoms
(half, checkpoint, resume, rest), then show on held-out subjects that the ONE trained generator beats the
trivial answers on all three tasks (``../shared/LEARNING.md``, issue 15):

* ``sr``   T2 -> T2, thick (every ``t``-th slice) -> thin, the slice position δ fed to G;
* ``cms``  T1 -> T2 on the same grid;
* ``cmsr`` thick T1 -> thin T2.

Writes ``heldout/{sr,cms,cmsr}/<case>/<role>.nii.gz`` (``medsynth_core.heldout``), ``metrics.json``,
``figure.png`` (every task) and ``figure_<task>.png`` (source | baselines | ours | target | errors).

Subjects: training phantoms use seeds ``seed .. seed + data.phantom_subjects - 1``; the held-out phantoms
use seeds ``HELDOUT_SEED ..`` (never trained on). Intensities: uint8 / 255 (the metric's [0, 1] scale);
ours is ``(G + 1) / 2``. Volumes are ``(D, H, W)``, slices along D, PSNR over the whole volume.

Baselines (standard versions, computed here on the same cases; the thick volume is the decimation of the
thin one with the first slice aligned, so LR slice ``k`` lies at thin slice ``k·t``):

* ``nearest``: every thin slice takes the nearest thick slice;
* ``trilinear``: ``torch.nn.functional.interpolate(mode="trilinear", align_corners=True)`` on the thick
  slice positions (in-plane unchanged), the last ``t-1`` slices (beyond the last thick slice) repeat it;
* ``copy_source``: the source volume unchanged;
* ``oracle_linear``: per case least-squares ``a·source + b`` against the target (uses the target);
* ``oracle_linear_trilinear`` (CMSR): the same fit applied to the trilinear-upsampled thick source;
  ``trilinear_source``: that upsampled source unchanged.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import heldout as H
from medsynth_core import training as T
from medsynth_core.config import bundled_configs, load_config

from .config import Config

DEMO_CONFIG = bundled_configs(__file__) / "demo.yaml"
# the demo recipe = configs/demo.yaml + these overrides: no SAM weights in a demo, so the SAM loss is off
# (the random stand-in ViT of the unit tests would be a meaningless feature loss); both cores of the 2-core
# budget (1.26x faster than one thread here; run_demo restores the caller's count afterwards)
RECIPE: tuple[str, ...] = ("loss.lambda_sam=0", "run.threads=2")
HELDOUT_SEED = 1000  # held-out phantom subjects: seeds 1000, 1001, ... (training: seed .. seed + n - 1)
HELDOUT_CASES = 3
SR_THICKNESS = 2  # thick-slice factor of the SR and CMSR examples
# task -> (source, target, thickness)
TASKS: dict[str, tuple[str, str, int]] = {
    "sr": ("T2", "T2", SR_THICKNESS),
    "cms": ("T1", "T2", 1),
    "cmsr": ("T1", "T2", SR_THICKNESS),
}
# ours >= baseline + margin (dB) per task (issue 15)
MARGINS: dict[str, dict[str, float]] = {
    "sr": {"trilinear": 0.5, "nearest": 2.0},
    "cms": {"oracle_linear": 1.0, "copy_source": 2.0},
    "cmsr": {"oracle_linear_trilinear": 1.0},
}


def demo_config(overrides=()) -> Config:
    """configs/demo.yaml + :data:`RECIPE` + ``overrides``."""
    if DEMO_CONFIG.is_file():
        return load_config(Config, DEMO_CONFIG, [*RECIPE, *overrides])
    raise FileNotFoundError(f"{DEMO_CONFIG}: demo config missing from the installation")


# ------------------------------------------------------------------------------------ baselines


def trilinear_slices(thick: np.ndarray, t: int, depth: int) -> np.ndarray:
    """Linear interpolation along the slice axis between thick slices at thin positions ``k·t``
    (``F.interpolate`` trilinear, ``align_corners=True``); slices beyond the last thick one repeat it."""
    x = torch.from_numpy(np.asarray(thick, np.float64))
    n = x.shape[0]
    if t > 1 and n > 1:
        x = F.interpolate(
            x[None, None], size=((n - 1) * t + 1, *x.shape[1:]), mode="trilinear", align_corners=True
        )[0, 0]
    if x.shape[0] < depth:
        x = torch.cat([x, x[-1:].expand(depth - x.shape[0], -1, -1)])
    return x[:depth].numpy()


def nearest_slices(thick: np.ndarray, t: int, depth: int) -> np.ndarray:
    """Every thin slice ``j`` takes the nearest thick slice ``round(j / t)`` (ties to the lower one)."""
    idx = np.minimum(np.ceil(np.arange(depth) / t - 0.5).astype(int), thick.shape[0] - 1)
    return np.asarray(thick, np.float64)[np.maximum(idx, 0)]


def heldout_volumes(cfg: Config, n: int = HELDOUT_CASES) -> list[dict[str, np.ndarray]]:
    from .data import phantom_volumes

    mods = list(dict.fromkeys([*cfg.data.modalities, *cfg.data.sources]))
    return phantom_volumes(n, cfg.data.phantom_shape, mods, seed=HELDOUT_SEED)


@torch.no_grad()
def heldout_tasks(
    g, cfg: Config, volumes: list[dict[str, np.ndarray]], out: Path | None, seed: int = 0
) -> list[H.HeldoutTask]:
    """Score ``g`` (eval mode) on every held-out volume for every task of :data:`TASKS`."""
    from .infer import synthesize_volume

    g.eval()
    tasks = []
    for name, (src, tgt, t) in TASKS.items():
        task = H.HeldoutTask(out if out is not None else ".", name, write=out is not None)
        for i, vol in enumerate(volumes):
            target = vol[tgt].astype(np.float64) / 255.0
            depth = target.shape[0]
            thick = vol[src][::t] if t > 1 else vol[src]
            pred = synthesize_volume(g, cfg, thick, tgt, thickness=t, seed=seed + i)[:depth]
            ours = (pred.astype(np.float64) + 1.0) / 2.0
            s01 = thick.astype(np.float64) / 255.0
            if t == 1:
                baselines = {"copy_source": H.copy_source(s01), "oracle_linear": H.oracle_linear(s01, target)}
            else:
                tri = trilinear_slices(s01, t, depth)
                if src == tgt:
                    baselines = {"trilinear": tri, "nearest": nearest_slices(s01, t, depth)}
                else:
                    baselines = {
                        "trilinear_source": tri,
                        "oracle_linear_trilinear": H.oracle_linear(tri, target),
                    }
            task.add_case(f"case{i:02d}", target, ours, baselines=baselines, inputs={f"{src}_t{t}": s01})
        task.extra.update(source=src, target=tgt, thickness=t, margins_required=MARGINS[name])
        tasks.append(task)
    return tasks


def _panel(t: int, depth: int):
    """Show an in-between thin slice (a slice the thick input does not contain when t > 1)."""
    k = depth // 2 + (1 if t > 1 else 0)

    def panel(arr: np.ndarray) -> np.ndarray:
        return arr[k] if arr.shape[0] == depth else arr[min(k // t, arr.shape[0] - 1)]

    return panel


def run_demo(
    out: str | Path, steps: int | None = None, overrides=(), heldout_cases: int = HELDOUT_CASES
) -> dict[str, Any]:
    """Train the demo recipe (``steps`` default: ``train.steps`` of demo.yaml), resume once at half,
    score the EMA generator on the held-out phantoms; returns ``{task: {ours, <baseline>...}}`` and paths."""
    out = Path(out)
    for stale in (out / "run", out / "heldout"):
        if stale.exists():
            shutil.rmtree(stale)  # a fresh run every time (our own folders)
    cfg = demo_config(list(overrides))
    steps = int(steps or cfg.train.steps)
    half = max(steps // 2, 1)
    cfg = demo_config(
        [*overrides, f"train.steps={steps}", f"train.ckpt_every={half}", f"train.sample_every={half}"]
    )
    with T.num_threads(cfg.run.threads):  # the caller's thread count is restored afterwards
        return _train_and_score(out, cfg, steps, half, heldout_cases)


def _train_and_score(out: Path, cfg: Config, steps: int, half: int, heldout_cases: int) -> dict[str, Any]:
    from medsynth_core.checkpoint import CheckpointManager

    from .infer import load_generator
    from .train import train

    run_dir = out / "run"
    t0 = time.perf_counter()
    train(cfg, run_dir=run_dir, max_steps=half, quiet=True)
    resumed = train(cfg, run_dir=run_dir, max_steps=steps, quiet=True)  # resumes from step `half`
    train_s = time.perf_counter() - t0
    ckpt = CheckpointManager(run_dir / "checkpoints").latest()
    g, cfg = load_generator(ckpt)
    t1 = time.perf_counter()
    vols = heldout_volumes(cfg, heldout_cases)
    tasks = heldout_tasks(g, cfg, vols, out / "heldout", seed=cfg.run.seed)
    depth = vols[0][TASKS["sr"][1]].shape[0]
    for task in tasks:
        t = TASKS[task.task][2]
        H.save_heldout_figure(
            out / f"figure_{task.task}.png",
            task,
            max_cases=3,
            scale=4,
            panel=_panel(t, depth),
            baseline_errors=True,
        )
    fig = H.save_heldout_figure(
        out / "figure.png",
        tasks,
        max_cases=2,
        scale=3,
        panel=_panel(SR_THICKNESS, depth),
        baseline_errors=True,
    )
    eval_s = time.perf_counter() - t1
    last = resumed["last"]
    doc = H.write_metrics(
        out / "metrics.json",
        tasks,
        train={
            "steps": steps,
            "resumed_at": half,
            "seconds": train_s,
            "final_loss": last.get("G"),
            "final_terms": last,
        },
        eval_seconds=eval_s,
        config="demo",
        checkpoint=str(ckpt),
        subjects={
            "train_seeds": [
                cfg.run.seed,
                cfg.run.seed + max(cfg.data.phantom_subjects - 2, 0),
            ],  # the last: loader test
            "heldout_seeds": [HELDOUT_SEED, HELDOUT_SEED + heldout_cases - 1],
        },
        losses_on={
            "adversarial": True,
            "lambda_l1": cfg.loss.lambda_l1,
            "lambda_r1": cfg.loss.lambda_r1,
            "lambda_sam": cfg.loss.lambda_sam,
        },
        note="brain phantoms, SAM loss off (no SAM weights in the demo); numbers are not paper results",
    )
    result: dict[str, Any] = {
        "figure": str(fig),
        "metrics": str(out / "metrics.json"),
        "train_seconds": train_s,
    }
    for name, block in doc["heldout"].items():
        result[name] = {"ours": block["method"], **block["baselines"]}
    return result


__all__ = [
    "HELDOUT_CASES",
    "HELDOUT_SEED",
    "MARGINS",
    "TASKS",
    "demo_config",
    "heldout_tasks",
    "heldout_volumes",
    "nearest_slices",
    "run_demo",
    "trilinear_slices",
]

"""``fda-vae demo``: train the demo recipe from scratch on the core DCE phantom (arterial ↔ venous), resume
once, and show on held-out subjects that the trained model beats the trivial answers
(``../shared/LEARNING.md``): ``heldout/{a_to_b,b_to_a}/<case>/<role>.nii.gz``, ``figure.png`` (one row per
case: source | copy_source | oracle_linear | ours | target | error) and ``metrics.json``.

Subjects: training slices from ``data.phantom_seed``, the validation slices of training (best-checkpoint
selection) from ``phantom_seed + 1`` and the held-out slices from ``phantom_seed + 2``, so nothing that was
scored was seen or used for selection. The final checkpoint is the one evaluated.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core import heldout as H
from medsynth_core.config import config_from_dict, config_to_dict, load_config

from .config import Config

PACKAGE_DIR = Path(__file__).resolve().parents[2]
DEMO_YAML = PACKAGE_DIR / "configs" / "demo.yaml"
HELDOUT_CASES = 16  # held-out phantom slices scored per direction
HELDOUT_SEED_OFFSET = 2  # held-out subjects: data.phantom_seed + 2 (train: + 0, validation: + 1)

# The same settings as configs/demo.yaml (used when the package is installed without its configs folder;
# a test keeps the two identical).
DEMO_CONFIG: dict[str, Any] = {
    "run": {"name": "demo", "root": "runs", "device": "cpu", "threads": 1},
    "model": {"channels": [16, 32], "num_res_blocks": 1, "latent_channels": 8, "norm_num_groups": 4},
    "disc": {"num_layers_d": 2, "channels": 8},
    "loss": {"w_perc": 0.0},
    "data": {
        "source": "phantom",
        "image_size": 32,
        "phantom_phases": ["arterial", "venous"],
        "phantom_train": 256,
        "phantom_val": 8,
        "phantom_size": 64,
    },
    "train": {
        "batch_size": 4,
        "lr_g": 2.0e-3,
        "lr_d": 1.0e-4,
        "lr_schedule": "cosine",
        "steps": 1500,
        "ckpt_every": 750,
        "val_every": 750,
        "sample_every": 750,
        "log_every": 50,
    },
    "eval": {"batch_size": 16},
}

# ours >= baseline + margin (dB), both directions, deterministic mode (issue 12)
MARGINS = {"copy_source": 2.0, "oracle_linear": 0.5}


def demo_config(overrides: list[str] | None = None) -> Config:
    if DEMO_YAML.is_file():
        return load_config(Config, DEMO_YAML, overrides or [])
    return load_config(Config, None, overrides or [], base=DEMO_CONFIG)


def heldout_dataset(cfg: Config, n: int = HELDOUT_CASES):
    """The held-out phantom slices (subjects from ``data.phantom_seed + 2``, never trained or validated on)."""
    from medsynth_core.phantoms import contrast_phase_slices

    from .data import ArrayPairDataset

    d = cfg.data
    ph = contrast_phase_slices(
        n=n, size=d.phantom_size, phases=tuple(d.phantom_phases), seed=d.phantom_seed + HELDOUT_SEED_OFFSET
    )
    keys = [f"case{i:02d}" for i in range(n)]
    return ArrayPairDataset(ph.images[d.phantom_phases[0]], ph.images[d.phantom_phases[1]], keys, d.image_size)


@torch.no_grad()
def heldout_tasks(model, dataset, phases: tuple[str, str], out: Path | None, seed: int = 0) -> list[H.HeldoutTask]:
    """Score ``model`` on ``dataset`` in both directions against ``copy_source`` and ``oracle_linear``.

    Deterministic (−μ) is the prediction written and scored; the sampled decode (−μ + σε, seeded) is reported
    beside it per case (``metrics.psnr_sampled``) and as ``sampled`` in each block. ``out=None``: no files."""
    model.eval()
    a = torch.stack([dataset[i]["a"] for i in range(len(dataset))])
    b = torch.stack([dataset[i]["b"] for i in range(len(dataset))])
    keys = [dataset[i]["key"] for i in range(len(dataset))]
    tasks = []
    for task, src, x, y, names in (("a_to_b", "a", a, b, phases), ("b_to_a", "b", b, a, phases[::-1])):
        det = model.translate(x, src)
        smp = model.translate(x, src, sample=True, generator=torch.Generator().manual_seed(seed))
        t = H.HeldoutTask(out if out is not None else ".", task, write=out is not None)
        x01, y01 = ((x + 1) / 2).clamp(0, 1), ((y + 1) / 2).clamp(0, 1)
        sampled = []
        for i, key in enumerate(keys):
            src_img, tgt = x01[i, 0], y01[i, 0]
            s = H.score(((smp[i, 0] + 1) / 2).clamp(0, 1), tgt)
            sampled.append(s)
            t.add_case(
                key,
                tgt,
                (det[i, 0] + 1) / 2,
                baselines={"copy_source": H.copy_source(src_img), "oracle_linear": H.oracle_linear(src_img, tgt)},
                inputs={names[0]: src_img},
                metrics={"psnr_sampled": s["psnr_db"], "ssim_sampled": s["ssim"]},
            )
        t.extra.update(
            source=names[0],
            target=names[1],
            mode="deterministic",
            sampled={
                "psnr_db": float(np.mean([s["psnr_db"] for s in sampled])),
                "ssim": float(np.mean([s["ssim"] for s in sampled])),
            },
        )
        tasks.append(t)
    return tasks


def run_demo(out: str | Path, overrides: list[str] | None = None, heldout_cases: int = HELDOUT_CASES) -> dict[str, Any]:
    from medsynth_core.io import write_image

    from .data import phantom_datasets
    from .infer import load_generator, synthesize_file
    from .train import train

    out = Path(out)
    run_root = out / "run"
    for stale in (run_root, out / "heldout"):
        if stale.exists():
            shutil.rmtree(stale)  # a fresh run every time (our own folders)
    cfg = demo_config([f"run.root={run_root}", *(overrides or [])])
    datasets = phantom_datasets(cfg)
    total = cfg.train.steps
    half = total // 2
    t0 = time.perf_counter()
    first_dict = config_to_dict(cfg)
    # the first half keeps the full run's schedule horizon, so the resumed run equals an uninterrupted one
    first_dict["train"] = {**first_dict["train"], "steps": half, "lr_decay_steps": cfg.train.lr_decay_steps or total}
    first = train(config_from_dict(Config, first_dict), datasets=datasets)
    second = train(cfg, datasets=datasets)  # resumes from the step-`half` checkpoint
    train_s = time.perf_counter() - t0
    if second["start"] != half:
        raise RuntimeError(f"demo resume failed: started at step {second['start']}, expected {half}")
    model, cfg = load_generator(Path(second["checkpoint"]))
    phases = tuple(cfg.data.phantom_phases)
    test = heldout_dataset(cfg, heldout_cases)
    tasks = heldout_tasks(model, test, phases, out / "heldout", seed=cfg.run.seed)
    H.save_heldout_figure(out / "figure.png", tasks, max_cases=4, scale=3, baseline_errors=True)
    # NIfTI round trip through the synthesize verb's code path (a held-out source slice)
    nii = write_image(test.a[0, 0].T.copy(), out / "synth" / f"{phases[0]}_slice.nii.gz")
    synth = synthesize_file(model, cfg, nii, out / "synth" / f"{phases[1]}_synth.nii.gz", src="a")
    last = second["last"]
    doc = H.write_metrics(
        out / "metrics.json",
        tasks,
        train={
            "steps": total,
            "seconds": train_s,
            "final_loss": last.get("g_total"),
            "final_terms": {k: v for k, v in last.items() if k in ("trans", "rec", "kl", "fda", "perc", "adv")},
            "resumed_at": second["start"],
            "first_half_val": first["val"],
        },
        config="demo",
        phases=list(phases),
        losses_on={k: v for k, v in config_to_dict(cfg)["loss"].items() if k.startswith("w_")},
        subjects={
            "train": [cfg.data.phantom_seed, cfg.data.phantom_train],
            "validation": [cfg.data.phantom_seed + 1, cfg.data.phantom_val],
            "heldout": [cfg.data.phantom_seed + HELDOUT_SEED_OFFSET, heldout_cases],
        },
        margins_required=MARGINS,
        synthesized_nifti=synth["output"],
    )
    result: dict[str, Any] = {
        "figure": str(out / "figure.png"),
        "metrics": str(out / "metrics.json"),
        "heldout": str(out / "heldout"),
        "train_seconds": train_s,
    }
    for task, block in doc["heldout"].items():
        result[task] = {
            "ours": block["method"],
            "sampled": block["sampled"]["psnr_db"],
            **{f"{k}": v for k, v in block["baselines"].items()},
        }
    return result


__all__ = ["DEMO_CONFIG", "MARGINS", "demo_config", "heldout_dataset", "heldout_tasks", "run_demo"]

"""``drdm demo``: train the demo config briefly on phantoms, resume once, augment, evaluate, draw a figure."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from medsynth_core.checkpoint import CheckpointManager
from medsynth_core.io import write_image
from medsynth_core.metrics import jacobian_determinant
from medsynth_core.phantoms import labelled_anatomy
from medsynth_core.training import set_num_threads
from medsynth_core.viz import label_overlay, save_grid, to_uint8

from .config import build_diffusion, load
from .evaluate import downstream_check, field_stats, forward_level_stats
from .infer import augment_folder
from .train import load_network, train


def write_phantoms(folder: Path, ndims: int, size: int, count: int, seed: int = 500) -> tuple[Path, Path]:
    imgs, labs = folder / "images", folder / "labels"
    for i in range(count):
        p = labelled_anatomy((size,) * ndims, n_labels=3, seed=seed + i)
        write_image(p.image, imgs / f"phantom{i:02d}.nii.gz", affine=np.diag([1.5, 1.5, 2.0, 1.0]))
        write_image(
            p.labels.astype(np.int16), labs / f"phantom{i:02d}.nii.gz", affine=np.diag([1.5, 1.5, 2.0, 1.0])
        )
    return imgs, labs


def deformation_figure(path: Path, items: list[dict], net_steps: int | None = None) -> None:
    """Rows: forward DRDM deformations Psi_rand(T') of the image with warped labels and their Jacobian maps,
    then the recovered deformations phi (the demo network is barely trained) with labels and Jacobian maps."""

    def mid(v):
        v = v.detach().float().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return v[v.shape[0] // 2] if v.ndim == 3 else v

    def det_img(ddf):
        return to_uint8(mid(jacobian_determinant(ddf[None])[0]), (0.0, 2.0))

    def fold(ddf):
        return f"fold {100 * float((jacobian_determinant(ddf[None]) <= 0).float().mean()):.1f}%"

    first = items[0]
    img0, lab0 = mid(first["original"]), mid(first["original_labels"])
    blank = to_uint8(np.ones_like(img0), (0.0, 2.0))
    rows = [
        [img0] + [mid(it["noisy"]) for it in items],
        [label_overlay(img0, lab0)]
        + [label_overlay(mid(it["noisy"]), mid(it["noisy_onehot"].argmax(0))) for it in items],
        [blank] + [det_img(it["psi_ddf"]) for it in items],
        [label_overlay(img0, lab0)]
        + [label_overlay(mid(it["image"]), mid(it["onehot"].argmax(0))) for it in items],
        [blank] + [det_img(it["ddf"]) for it in items],
    ]
    titles = [
        ["image"] + [f"Psi_rand T'={it['t_start']}" for it in items],
        ["labels"] + ["warped labels"] * len(items),
        ["detJ [0,2]"] + [fold(it["psi_ddf"]) for it in items],
        ["labels"]
        + [f"phi, {net_steps}-step net" if net_steps is not None else "recovered phi"] * len(items),
        ["detJ [0,2]"] + [fold(it["ddf"]) for it in items],
    ]
    save_grid(path, rows, titles=titles, scale=4)


def run_demo(out: str | Path, overrides: list[str] | tuple[str, ...] = (), downstream: bool = True) -> dict:
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load("demo", [f"out_dir={out / 'runs'}", *overrides])
    set_num_threads(cfg.train.threads)
    half = max(1, cfg.train.steps // 2)
    first = train(cfg, max_steps=half)  # checkpoints at `half`
    final = train(cfg)  # resumes automatically from the run directory's latest checkpoint
    ckpt = CheckpointManager(Path(final["run_dir"]) / "checkpoints").latest()
    net, cfg = load_network(ckpt)
    nd, s = cfg.model.ndims, cfg.diffusion.img_size
    imgs, labs = write_phantoms(out / "phantoms", nd, s, 1)
    torch.manual_seed(1)
    aug = augment_folder(net, cfg, imgs, out / "augmented", labels=labs)
    # figure: the phantom, its DRDM deformations, warped labels and Jacobian maps
    items = aug["preview"]
    deformation_figure(out / "figure.png", items, net_steps=final["step"])
    levels = forward_level_stats(build_diffusion(cfg, sampling=True), [1, 10, 20, 40, 60, 79], seeds=range(2))
    metrics = {
        "train": {
            "resumed_from_step": first["step"],
            "final_step": final["step"],
            "final_loss": final["loss"],
            "dist": final["dist"],
            "ang": final["ang"],
            "reg": final["reg"],
        },
        "forward_levels": levels,
        "augment": {"files": aug["files"], "written": len(aug["written"])},
        "recovery": [{"t_start": it["t_start"], **field_stats(it["phi_norm"][None])} for it in items],
    }
    if downstream:
        metrics["downstream"] = downstream_check(net, cfg, n_train=3, n_test=6, n_aug=2, steps=100)
    metrics["seconds"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics

"""Phantom test case and the ``demo`` verb: train the demo prior briefly (checkpoint, resume once),
reconstruct a held-out phantom from sparse SAX + 3 LAX planes, evaluate against z-linear/nearest
interpolation and the DiffAE seeds, write figure.png and metrics.json."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .geometry import DenseGrid, LaxPlane, grid_world_points

VIEWS = ("2ch", "3ch", "4ch")


def phantom_case(
    n_slices: int = 5,
    K: int = 4,
    size: int = 32,
    seed: int = 0,
    frame: int = 0,
    slice_spacing: float = 8.0,
    pixel_spacing: float = 1.5,
    n_frames: int = 2,
) -> dict:
    """Sparse SAX stack (every K-th dense slice), 3 LAX planes and the dense ground truth from one analytic
    scene (``medsynth_core.phantoms.cardiac_cine``)."""
    from medsynth_core.phantoms import cardiac_cine

    ph = cardiac_cine(
        n_frames=n_frames,
        n_slices=n_slices,
        size=size,
        slice_spacing=slice_spacing,
        pixel_spacing=pixel_spacing,
        seed=seed,
    )
    grid = DenseGrid(ph.sax_affine, n_slices, K, (size, size))
    gt, gt_lab = ph.scene.sample_scene(grid_world_points(grid.affine, grid.shape), frame)
    planes = [LaxPlane(ph.lax[v].image[frame].astype(np.float64), ph.lax[v].affine, v) for v in VIEWS]
    return {
        "sax": ph.sax[frame].astype(np.float64),
        "sax_affine": ph.sax_affine,
        "planes": planes,
        "gt": gt.astype(np.float64),
        "gt_labels": gt_lab,
        "grid": grid,
        "phantom": ph,
    }


def run_demo(
    out: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    prior: str | Path | None = None,
) -> dict:
    """Train the demo prior (half, checkpoint, resume to the end) or load ``prior``; reconstruct the held-out
    phantom; compare with z-linear/nearest interpolation and the DiffAE seeds."""
    import torch

    from medsynth_core.config import bundled_configs, load_config
    from medsynth_core.viz import save_grid

    from .config import Config
    from .diffusion import GaussianDiffusion
    from .evaluate import compare_methods
    from .infer import DiffAEPrior, linear_interp_z, nearest_interp_z, reconstruct
    from .train import load_prior, train

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = Path(config) if config else bundled_configs(__file__) / "demo.yaml"
    cfg = load_config(Config, cfg_path, list(overrides or []) + [f"run_root={out / 'runs'}"])
    prior_path = str(prior) if prior else None
    if prior_path is None:
        total = cfg.train.steps
        half = max(1, total // 2)
        # train half, checkpoint, then resume from that checkpoint to the end (contract: resume once)
        run = train(replace(cfg, train=replace(cfg.train, steps=half, ckpt_every=half)))
        run = train(cfg)
        ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
        model, pcfg = load_prior(ckpts[-1])
    else:
        model, pcfg = load_prior(prior_path)
        total = None
    cfg = replace(cfg, model=pcfg.model, diffusion=pcfg.diffusion)  # the phantom size follows the prior
    t_train = time.time() - t0

    ic = cfg.inverse
    case = phantom_case(n_slices=5, K=ic.K, size=cfg.model.image_size, seed=0)
    diffusion = GaussianDiffusion(cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
    prior = DiffAEPrior(model, diffusion, ic.encode_steps, ic.decode_steps, ic.checkpoint, ic.flip_h)
    torch.manual_seed(cfg.seed)
    res = reconstruct(prior, case["sax"], case["sax_affine"], case["planes"], ic)
    t_rec = time.time() - t0 - t_train
    grid = case["grid"]
    spacing = (grid.slice_spacing, case["phantom"].pixel_spacing, case["phantom"].pixel_spacing)
    methods = {
        "linear": linear_interp_z(case["sax"], ic.K),
        "nearest": nearest_interp_z(case["sax"], ic.K),
        "diffae_seed": res.seeds,
        "diffae_lax": res.volume,
    }
    metrics = compare_methods(case["gt"], methods, ic.K, spacing=spacing)
    h = res.history
    summary = {
        "config": str(cfg_path),
        "train_steps": total,
        "prior": prior_path,
        "inverse_iterations": res.iterations,
        "loss_first": h[0]["loss"] if h else None,
        "loss_last": h[-1]["loss"] if h else None,
        "methods": metrics,
        "optimised_beats_linear_heldout_psnr": bool(
            metrics["diffae_lax"]["heldout_psnr"] > metrics["linear"]["heldout_psnr"]
        ),
        "optimised_beats_linear_heldout_psnr3d": bool(
            metrics["diffae_lax"]["heldout_psnr3d"] > metrics["linear"]["heldout_psnr3d"]
        ),
        "seconds": {"train": t_train, "reconstruct": t_rec},
    }
    d = grid.D
    mid = [k for k in range(d) if k % ic.K][len([k for k in range(d) if k % ic.K]) // 2]
    rows = [
        [case["gt"][mid], methods["linear"][mid], res.seeds[mid], res.volume[mid]],
        [
            case["gt"][:, grid.hw[0] // 2],
            methods["linear"][:, grid.hw[0] // 2],
            res.seeds[:, grid.hw[0] // 2],
            res.volume[:, grid.hw[0] // 2],
        ],
        [p.image for p in case["planes"]] + [case["sax"][len(case["sax"]) // 2]],
    ]
    titles = [
        [f"GT slice {mid}", "linear z", "DiffAE seed", "DiffAE+LAX"],
        ["GT coronal", "linear", "seed", "opt"],
        list(VIEWS) + ["SAX input"],
    ]
    save_grid(out / "figure.png", rows, titles=titles, value_range=(0.0, 1.0), scale=4)
    summary["seconds"]["total"] = time.time() - t0
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary

"""Phantom test case and the ``demo`` verb (``../shared/LEARNING.md``).

``run_demo`` trains the demo recipe (``configs/toy.yaml`` by default: the 16 px micro DiffAE, half the steps,
checkpoint, resume to the end), then reconstructs held-out phantom subjects (seeds the training never used)
from a sparse SAX stack plus the 2ch/3ch/4ch LAX planes and scores the **non-acquired dense slices** against
z-linear interpolation and the decoded DiffAE seeds. It writes

* ``heldout/<case>/<role>.nii.gz``: ``input_sax`` (the sparse stack) and ``input_lax_<view>`` (one-slice
  volumes) with their real affines, so a viewer overlays them; ``target``, ``pred``, ``baseline_z_linear`` and
  ``baseline_seeds``: the held-out dense slices (the scored voxels, stacked in dense order, dense slice
  ``heldout_slices[j]`` at file slice j) in [0, 1];
* ``dense/<case>/{target,pred,z_linear,seeds}.nii.gz``: the whole dense volumes on the real dense grid;
* ``metrics.json``: the ``heldout`` block (volume PSNR over the held-out slices of each case, averaged over
  cases; + the mean per-slice PSNR and blood-pool Dice), ``train`` and the inverse settings;
* ``figure.png``: per case a held-out short-axis slice and a through-plane cut: sparse SAX | z-linear | seeds |
  ours | dense target | |ours − target|, plus one LAX plane with the slice's intersection line.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .geometry import DenseGrid, LaxPlane

VIEWS = ("2ch", "3ch", "4ch")
DEMO_CONFIG = "toy.yaml"
# issue 14 / spec §7-E4 on the held-out dense slices: volume PSNR over them (dB)
MARGINS = {"z_linear": 1.0, "seeds": 0.5}
PER_SLICE_MARGIN = 0.5  # mean per-slice PSNR: ours >= z_linear + 0.5 dB
# demo.family -> stack shift along the long axis (mm), added to demo.slice_offset
FAMILY_OFFSETS = {"apex": 0.0, "base": -6.0}


def phantom_case(
    n_slices: int = 5,
    K: int = 4,
    size: int = 32,
    seed: int = 0,
    frame: int = 0,
    slice_spacing: float = 8.0,
    pixel_spacing: float = 1.5,
    n_frames: int = 2,
    slice_offset: float = 0.0,
    supersample: int = 1,
) -> dict:
    """Sparse SAX stack (every K-th dense slice), 3 LAX planes and the dense ground truth from one analytic
    scene (``medsynth_core.phantoms.cardiac_cine``), all rendered with the same in-plane ``supersample``."""
    from medsynth_core.phantoms import cardiac_cine
    from medsynth_core.phantoms.cardiac import render_grid

    ph = cardiac_cine(
        n_frames=n_frames,
        n_slices=n_slices,
        size=size,
        slice_spacing=slice_spacing,
        pixel_spacing=pixel_spacing,
        seed=seed,
        slice_offset=slice_offset,
        supersample=supersample,
    )
    grid = DenseGrid(ph.sax_affine, n_slices, K, (size, size))
    gt, gt_lab = render_grid(ph.scene, grid.affine, grid.shape, frame, ph.supersample)
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


def demo_case(cfg, seed: int) -> dict:
    """The held-out phantom ``seed`` with the geometry of ``cfg.demo`` and ``cfg.data``."""
    d = cfg.demo
    return phantom_case(
        n_slices=d.n_slices,
        K=cfg.inverse.K,
        size=cfg.model.image_size,
        seed=seed,
        frame=d.frame,
        slice_spacing=d.slice_spacing,
        pixel_spacing=cfg.data.phantom_pixel_spacing,
        n_frames=d.n_frames,
        slice_offset=d.slice_offset + FAMILY_OFFSETS[d.family],
        supersample=cfg.data.phantom_supersample,
    )


def heldout_slices(D: int, K: int) -> list[int]:
    """Dense indices that no SAX slice acquired (the scored slices)."""
    return [i for i in range(D) if i % K]


def demo_config(config: str | Path | None = None, overrides: list[str] | None = None):
    """The demo recipe: ``configs/toy.yaml`` (or ``config``) with ``overrides``; returns ``(cfg, path)``."""
    from medsynth_core.config import bundled_configs, load_config

    from .config import Config

    path = Path(config) if config else bundled_configs(__file__) / DEMO_CONFIG
    return load_config(Config, path, list(overrides or [])), path


def _lax_ijk(aff: np.ndarray) -> np.ndarray:
    """LAX ``(r, c, 0)`` affine → NIfTI ``(i, j, k) = (c, r, normal)`` affine of a one-slice volume."""
    ijk = np.eye(4)
    ijk[:3, 0], ijk[:3, 1], ijk[:3, 2], ijk[:3, 3] = aff[:3, 1], aff[:3, 0], aff[:3, 2], aff[:3, 3]
    return ijk


def _intersection(plane: LaxPlane, grid_affine: np.ndarray, index: int) -> np.ndarray:
    """The LAX pixels where dense slice ``index`` cuts the plane: per image column, the pixel nearest to the
    slice (if within half a dense slice of it), a one-pixel line."""
    h, w = np.asarray(plane.image).shape
    rc = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2).astype(float)
    pts = rc @ plane.affine[:3, :2].T + plane.affine[:3, 3]
    vox = (pts - grid_affine[:3, 3]) @ np.linalg.inv(grid_affine[:3, :3]).T
    dist = np.abs(vox[:, 0] - index).reshape(h, w)
    line = np.zeros((h, w), bool)
    rows = dist.argmin(0)
    cols = np.arange(w)
    line[rows, cols] = dist[rows, cols] <= 0.5 + 1e-6
    return line


def _rgb(img: np.ndarray, value_range=(0.0, 1.0), line: np.ndarray | None = None) -> np.ndarray:
    from medsynth_core.viz import to_uint8

    g = to_uint8(np.asarray(img, np.float64), value_range)
    out = np.repeat(g[..., None], 3, -1)
    if line is not None:
        out[line] = (255, 40, 40)
    return out


def save_figure(path: Path, panels: list[dict[str, Any]]) -> Path:
    """Per case two rows (a held-out SAX slice; a through-plane cut): sparse SAX | z-linear | seeds | ours |
    dense target | |ours − target| (error on [0, 0.5]), the first row ending with a LAX plane and the red
    line where the shown slice cuts it. Titles carry the PSNR of the panel's slice (row 1) or of the case's
    held-out slices (row 2)."""
    from medsynth_core.viz import save_grid

    rows, titles, names = [], [], []
    for p in panels:
        for cut in ("slice", "cut"):
            imgs = p[cut]
            row = [_rgb(imgs["sax"])] + [_rgb(imgs[k]) for k in ("z_linear", "seeds", "pred", "target")]
            row.append(_rgb(np.abs(imgs["pred"] - imgs["target"]), (0.0, 0.5)))
            s = p["scores"][cut]
            tit = [
                imgs["sax_title"],
                f"z-linear {s['z_linear']:.1f}dB",
                f"seeds {s['seeds']:.1f}dB",
                f"ours {s['pred']:.1f}dB",
                "dense target",
                "|ours-target|",
            ]
            if cut == "slice":
                row.append(_rgb(p["lax"], line=p["lax_line"]))
                tit.append(f"{p['lax_name']} + slice line")
            rows.append(row)
            titles.append(tit)
            names.append(f"{p['case']} {'SAX slice' if cut == 'slice' else 'through-plane'}")
    return save_grid(path, rows, titles=titles, scale=6, row_titles=names)


def run_demo(
    out: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    prior: str | Path | None = None,
) -> dict:
    """Train the demo prior (half the steps, checkpoint, resume to the end) or load ``prior``; reconstruct the
    held-out phantoms; score the non-acquired dense slices against z-linear and the decoded seeds; write the
    ``../shared/LEARNING.md`` files. Returns a summary (ours and each baseline, per metric)."""
    import torch

    from medsynth_core import heldout as H
    from medsynth_core.cli import UserError
    from medsynth_core.io import MedicalImage, write_image

    from .diffusion import GaussianDiffusion
    from .evaluate import bloodpool_dice, psnr3d, slice_metrics
    from .geometry import dhw_to_ijk_affine
    from .infer import DiffAEPrior, linear_interp_z, load_prior, reconstruct
    from .train import train

    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg, cfg_path = demo_config(config, list(overrides or []) + [f"run.root={out / 'runs'}"])
    for stale in (out / "heldout", out / "dense"):
        shutil.rmtree(stale, ignore_errors=True)
    trained = set(range(1, cfg.data.phantom_subjects + 1)) if cfg.data.source == "phantom" else set()
    overlap = sorted(trained.intersection(cfg.demo.heldout_seeds))
    if overlap:
        raise UserError(
            f"{cfg_path}: demo.heldout_seeds {overlap} are training phantoms (seeds 1..{cfg.data.phantom_subjects}); "
            "use seed 0 or seeds above data.phantom_subjects"
        )
    train_info: dict[str, Any] = {}
    prior_path = str(prior) if prior else None
    if prior_path is None:
        total = cfg.train.steps
        half = max(1, total // 2)
        ta = time.time()
        train(cfg, until=half)  # checkpoint at half, then resume from it to the end (contract: resume once)
        run = train(cfg)
        ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
        model, pcfg = load_prior(ckpts[-1])
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        losses = [r for r in rows if any(k.endswith("loss") for k in r)]
        last = losses[-1] if losses else {}
        train_info = {
            "steps": total,
            "resumed_at": half,
            "seconds": time.time() - ta,
            "final_loss": next((v for k, v in last.items() if k.endswith("loss")), None),
            "checkpoint": str(ckpts[-1]),
        }
    else:
        model, pcfg = load_prior(prior_path)
        train_info = {"steps": None, "prior": prior_path, "seconds": 0.0}
    cfg = replace(cfg, model=pcfg.model, diffusion=pcfg.diffusion)  # the phantom size follows the prior
    t_train = time.time() - t0

    ic = cfg.inverse
    diffusion = GaussianDiffusion(cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
    dprior = DiffAEPrior(model, diffusion, ic.encode_steps, ic.decode_steps, ic.checkpoint, ic.flip_h)
    task = H.HeldoutTask(out / "heldout")
    per_slice: dict[str, list[float]] = {"method": [], "z_linear": [], "seeds": []}
    dice: dict[str, list[float]] = {"method": [], "z_linear": [], "seeds": []}
    panels, iters = [], []
    for seed in cfg.demo.heldout_seeds:
        case = demo_case(cfg, seed)
        grid = case["grid"]
        held = heldout_slices(grid.D, ic.K)
        torch.manual_seed(cfg.run.seed)
        res = reconstruct(dprior, case["sax"], case["sax_affine"], case["planes"], ic)
        iters.append(res.iterations)
        vols = {"pred": res.volume, "z_linear": linear_interp_z(case["sax"], ic.K), "seeds": res.seeds}
        vols = {k: np.clip(v, 0.0, 1.0) for k, v in vols.items()}
        gt = np.clip(case["gt"], 0.0, 1.0)
        name = f"seed{seed:03d}"
        extra = {}
        for key, label in (("pred", "method"), ("z_linear", "z_linear"), ("seeds", "seeds")):
            ps = slice_metrics(vols[key], gt, held)["psnr"]
            dc = bloodpool_dice(vols[key], gt, held)
            per_slice[label].append(ps)
            dice[label].append(dc)
            extra[f"psnr_slice_mean_{label}"] = ps
            extra[f"bloodpool_dice_{label}"] = dc
        # held-out stack: in-plane geometry of the dense grid, slice axis at the dense spacing from dense slice 1
        held_aff = grid.affine.copy()
        held_aff[:3, 3] = held_aff[:3, 3] + held[0] * held_aff[:3, 0]
        task.add_case(
            name,
            target=gt[held],
            pred=vols["pred"][held],
            baselines={"z_linear": vols["z_linear"][held], "seeds": vols["seeds"][held]},
            affine=dhw_to_ijk_affine(held_aff),
            metrics=extra,
        )
        cdir = out / "heldout" / name
        write_image(
            MedicalImage.from_dhw(case["sax"].astype(np.float32), dhw_to_ijk_affine(case["sax_affine"])),
            cdir / "input_sax.nii.gz",
        )
        for p in case["planes"]:
            arr = np.asarray(p.image, np.float32).T[:, :, None]  # (c, r, 1) disk order
            write_image(arr, cdir / f"input_lax_{p.name}.nii.gz", affine=_lax_ijk(p.affine))
        for key, vol in (("target", gt), *vols.items()):
            write_image(
                MedicalImage.from_dhw(vol.astype(np.float32), dhw_to_ijk_affine(grid.affine)),
                out / "dense" / name / f"{key}.nii.gz",
            )
        # figure panels: the held-out slice in the middle of the middle gap and the through-plane cut
        show = ic.K * ((cfg.demo.n_slices - 1) // 2) + ic.K // 2 if ic.K > 1 else held[len(held) // 2]
        show = show if show in held else held[len(held) // 2]
        m_near = int(round(show / ic.K))
        row = grid.hw[0] // 2
        sparse_cut = np.zeros((grid.D, grid.hw[1]))
        sparse_cut[:: ic.K] = case["sax"][:, row]
        sl = {k: v[show] for k, v in vols.items()} | {"target": gt[show], "sax": case["sax"][m_near]}
        sl["sax_title"] = f"SAX {m_near} (acquired)"
        cut = {k: v[:, row] for k, v in vols.items()} | {"target": gt[:, row], "sax": sparse_cut}
        cut["sax_title"] = "sparse SAX (cut)"

        def p1(a, show=show, gt=gt):
            return slice_metrics(a[show][None], gt[show][None], [0])["psnr"]

        sc_slice = {k: p1(v) for k, v in vols.items()}
        sc_cut = {k: psnr3d(v, gt, held) for k, v in vols.items()}
        lax = case["planes"][-1]  # 4ch: through both ventricles
        panels.append(
            {
                "case": name,
                "slice": sl,
                "cut": cut,
                "scores": {"slice": sc_slice, "cut": sc_cut},
                "lax": lax.image,
                "lax_line": _intersection(lax, grid.affine, show),
                "lax_name": lax.name,
            }
        )
    t_rec = time.time() - t0 - t_train

    def means(d: dict[str, list[float]]) -> dict[str, Any]:
        return {
            "method": float(np.mean(d["method"])),
            "baselines": {k: float(np.mean(v)) for k, v in d.items() if k != "method"},
        }

    task.extra = {
        "psnr_slice_mean_db": means(per_slice),
        "bloodpool_dice": means(dice),
        "scored": "the non-acquired dense slices of each case (volume PSNR pooled over them)",
    }
    save_figure(out / "figure.png", panels)
    doc = H.write_metrics(
        out / "metrics.json",
        task,
        train=train_info,
        config=str(cfg_path),
        subjects={
            "train": sorted(trained),
            "heldout": list(cfg.demo.heldout_seeds),
            "family": cfg.demo.family,
            "val_fraction": cfg.data.val_fraction,
        },
        heldout_slices=heldout_slices(cfg.inverse.K * (cfg.demo.n_slices - 1) + 1, cfg.inverse.K),
        inverse={
            "K": ic.K,
            "encode_steps": ic.encode_steps,
            "decode_steps": ic.decode_steps,
            "iterations": iters,
            "lr": ic.lr,
            "lambda_lax": ic.lambda_lax,
            "lambda_smooth": ic.lambda_smooth,
            "lambda_lat": ic.lambda_lat,
            "freeze_acquired": ic.freeze_acquired,
        },
        seconds={"train": t_train, "reconstruct": t_rec, "total": time.time() - t0},
    )
    block = doc["heldout"]
    return {
        "ours": block["method"],
        "baselines": block["baselines"],
        "psnr_slice_mean_db": block["psnr_slice_mean_db"],
        "bloodpool_dice": block["bloodpool_dice"],
        "seconds": doc["seconds"],
        "out": str(out),
    }


__all__ = [
    "DEMO_CONFIG",
    "MARGINS",
    "PER_SLICE_MARGIN",
    "demo_case",
    "demo_config",
    "heldout_slices",
    "phantom_case",
    "run_demo",
    "save_figure",
]

"""``drdm demo``: the demo recipe (``configs/demo.yaml``) trained from scratch, shown to learn on held-out
phantoms (``../shared/LEARNING.md``, issue 13).

1. Train ``train.steps`` steps on ``labelled_anatomy`` phantoms (seeds ``0..phantom_count-1``), stopping at
   half, checkpointing and resuming once (the resumed step is asserted to be the checkpoint's).
2. **Recovery** (``heldout/recovery/<case>/``): held-out phantoms (seeds from ``HELDOUT_SEED``) are diffused to
   t in ``LEVELS`` with the training forward process; the network's recovery field psi_hat = D(I_t, t) is
   compared with the true one psi* (the inverse of U_lab, spec section 3: psi* o (x + S U_lab) = -U_lab).
   Figures per case: mean per-voxel cosine and end-point error (EPE, voxels), beside the ``zero_field``
   baseline (no recovery; its EPE is mean |S psi*|). The NIfTI roles are images (``input_image`` = I_t,
   ``target`` = W(I_t, psi*), ``pred`` = W(I_t, psi_hat), ``baseline_zero_field`` = I_t, scored as PSNR by
   ``medsynth_core.heldout``) and the fields themselves (``field_target``, ``field_pred``,
   ``field_baseline_zero_field``, voxels), from which :func:`rescore_fields` recomputes cosine and EPE.
3. **Augmentation** (``augment/<case>/``): deformations phi sampled with the trained model (spec section 4,
   T' from ``augment.start_noise_step``) on held-out labelled phantoms: fold ratio (det(I + grad S phi) <= 0),
   mean/max |S phi| (% of S), against the random forward field Psi_rand(T') and Psi_rand rescaled to the same
   maximum magnitude as phi.
4. ``figure.png`` and ``metrics.json`` (``heldout.recovery`` with the field figures as extra keys, ``augment``,
   ``train``, ``forward_levels``).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core import heldout as H
from medsynth_core.checkpoint import CheckpointManager, load_checkpoint
from medsynth_core.io import read_image, write_image
from medsynth_core.metrics import jacobian_determinant
from medsynth_core.phantoms import labelled_anatomy
from medsynth_core.training import set_num_threads
from medsynth_core.viz import label_overlay, save_grid, to_uint8

from .config import DRDMConfig, build_diffusion, load
from .deform import warp
from .evaluate import forward_level_stats
from .infer import augment_units, load_network
from .train import train

HELDOUT_SEED = 10_000  # held-out phantom seeds start here (training phantoms: 0 .. data.phantom_count - 1)
HELDOUT_CASES = 8  # held-out phantoms per recovery level
LEVELS = (10, 20, 40)  # noise levels of the recovery check (issue 13)
AUG_CASES = 4  # held-out labelled phantoms augmented
AUG_SAMPLES = 4  # DRDM samples per phantom (T' = noise_steps(start_noise_step, noise_step, ...))
N_LABELS = 3
# issue 13 margins: cosine >= 0.6 and EPE <= 0.6 x zero field at every level; fold <= 1 %, max >= 10 % of S
MARGINS = {"cosine_min": 0.6, "epe_ratio_max": 0.6, "fold_max": 0.01, "mag_max_pct_min": 10.0}


def demo_config(overrides: list[str] | tuple[str, ...] = ()) -> DRDMConfig:
    return load("demo", list(overrides))


# --------------------------------------------------------------------------------------------- fields
def true_recovery(u_lab: torch.Tensor, iters: int = 40) -> torch.Tensor:
    """psi* with psi*(x + S U(x)) = -U(x): the inverse of the map x -> x + S U_lab(x), by the fixed point
    psi <- -W(U, psi) (converges for fold-free U; U_lab never folds, spec section 2)."""
    psi = -u_lab
    for _ in range(iters):
        psi = -warp(u_lab, psi, mode="bilinear", padding_mode="border")
    return psi


def field_scores(
    pred_vox: np.ndarray | torch.Tensor, target_vox: np.ndarray | torch.Tensor
) -> dict[str, float]:
    """Mean per-voxel cosine and end-point error (voxels) of ``pred`` against ``target``, both ``[nd, *S]``
    in voxels; ``epe_zero_px`` is the EPE of the zero field (mean |target|)."""
    p = torch.as_tensor(np.asarray(pred_vox), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(target_vox), dtype=torch.float64)
    pn, tn = p.norm(dim=0), t.norm(dim=0)
    cos = (p * t).sum(0) / (pn * tn).clamp_min(1e-12)
    return {
        "cosine": float(cos.mean()),
        "epe_px": float((p - t).norm(dim=0).mean()),
        "epe_zero_px": float(tn.mean()),
    }


def _field_to_disk(u_vox: np.ndarray) -> np.ndarray:
    """``[2, H, W]`` (components along tensor axes H, W) -> NIfTI disk order ``(W, H, 1, 2)`` with the
    components along the disk axes i (= W) and j (= H), like the images ``medsynth_core.heldout`` writes."""
    comps = [u_vox[1], u_vox[0]]
    return np.ascontiguousarray(np.stack([c.T[:, :, None] for c in comps], axis=-1)).astype(np.float32)


def _field_from_disk(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr, np.float32)
    return np.stack([arr[:, :, 0, 1].T, arr[:, :, 0, 0].T])


def rescore_fields(folder: str | Path) -> dict[str, dict[str, float]]:
    """Cosine / EPE of every case of ``heldout/recovery`` from its field NIfTI files alone."""
    out = {}
    for case in sorted(p for p in Path(folder).iterdir() if (p / "field_target.nii.gz").is_file()):
        load_f = lambda name, case=case: _field_from_disk(read_image(case / name).array)  # noqa: E731
        tgt = load_f("field_target.nii.gz")
        out[case.name] = {
            "pred": field_scores(load_f("field_pred.nii.gz"), tgt),
            "zero_field": field_scores(load_f("field_baseline_zero_field.nii.gz"), tgt),
        }
    return out


def heldout_images(cfg: DRDMConfig, n: int, seed: int = HELDOUT_SEED):
    s, nd = cfg.diffusion.img_size, cfg.model.ndims
    tex = cfg.data.phantom_texture  # held-out phantoms: the training family, unseen seeds
    return [labelled_anatomy((s,) * nd, n_labels=N_LABELS, seed=seed + i, texture=tex) for i in range(n)]


@torch.no_grad()
def recovery_task(
    net, cfg: DRDMConfig, out: Path | None, cases: int = HELDOUT_CASES, levels=LEVELS, seed: int = 0
):
    """The recovery check: a :class:`medsynth_core.heldout.HeldoutTask` ``recovery`` with the field figures
    per case (``metrics``) and per level (``extra``)."""
    task = H.HeldoutTask(out if out is not None else ".", "recovery", write=out is not None)
    diffusion = build_diffusion(cfg, sampling=False)  # the training forward process (Q6)
    s = cfg.diffusion.img_size
    x0 = torch.stack([torch.from_numpy(p.image)[None] for p in heldout_images(cfg, cases)])
    per_level: dict[str, dict[str, float]] = {}
    for t in levels:
        g = torch.Generator().manual_seed(seed * 1000 + int(t))
        tt = torch.full((cases,), int(t), dtype=torch.long)
        u_img, u_lab = diffusion.sample_fields(tt, cases, generator=g)
        x_t = warp(x0, u_img, mode="bilinear", padding_mode=cfg.diffusion.img_pad_mode)
        pred = net(x_t, tt, rec_num=cfg.model.rec_num)
        target = true_recovery(u_lab)
        img_pred = warp(x_t, pred, padding_mode=cfg.diffusion.img_pad_mode)
        img_tgt = warp(x_t, target, padding_mode=cfg.diffusion.img_pad_mode)
        acc: dict[str, list[float]] = {}
        for i in range(cases):
            pv, tv = (pred[i] * s).numpy(), (target[i] * s).numpy()
            sc = field_scores(pv, tv)
            name = f"case{i:02d}_t{int(t):02d}"
            task.add_case(
                name,
                target=img_tgt[i, 0],
                pred=img_pred[i, 0],
                baselines={"zero_field": x_t[i, 0]},
                inputs={"image": x_t[i, 0]},
                metrics={**sc, "t": int(t)},
            )
            if task.write:
                for role, field in (
                    ("field_target", tv),
                    ("field_pred", pv),
                    ("field_baseline_zero_field", 0 * tv),
                ):
                    write_image(_field_to_disk(field), task.dir / name / f"{role}.nii.gz")
            for k, v in sc.items():
                acc.setdefault(k, []).append(v)
        lv = {k: float(np.mean(v)) for k, v in acc.items()}
        lv["epe_ratio"] = lv["epe_px"] / lv["epe_zero_px"]
        lv["zero_field_cosine"] = 0.0
        per_level[f"t{int(t)}"] = lv
    task.extra = {
        "fields": per_level,
        "levels": [int(t) for t in levels],
        "cosine_min": min(v["cosine"] for v in per_level.values()),
        "epe_ratio_max": max(v["epe_ratio"] for v in per_level.values()),
        "field_metric": "mean per-voxel cosine(psi_hat, psi*) and EPE |S(psi_hat - psi*)| in voxels",
    }
    return task


# --------------------------------------------------------------------------------------- augmentation
def _fold(u_vox: torch.Tensor) -> float:
    return float((jacobian_determinant(u_vox[None]) <= 0).float().mean())


def _mag(u_vox: torch.Tensor) -> tuple[float, float]:
    m = u_vox.norm(dim=0)
    return float(m.mean()), float(m.max())


def deformation_figures(phi_vox: torch.Tensor, s: int) -> dict[str, float]:
    mean, mx = _mag(phi_vox)
    return {"fold": _fold(phi_vox), "mag_mean_px": mean, "mag_max_px": mx, "mag_max_pct": 100 * mx / s}


@torch.no_grad()
def augment_task(net, cfg: DRDMConfig, out: Path | None, cases: int = AUG_CASES, samples: int = AUG_SAMPLES):
    """DRDM deformations of held-out labelled phantoms vs the random field Psi_rand (raw and rescaled to
    phi's maximum magnitude). Writes ``augment/<case>/`` when ``out`` is given."""
    c = copy.deepcopy(cfg)
    c.augment.aug_coe = samples
    s = cfg.diffusion.img_size
    phantoms = heldout_images(cfg, cases, seed=HELDOUT_SEED + 500)
    torch.manual_seed(cfg.augment.seed)
    rows, per_case = [], {}
    for i, p in enumerate(phantoms):
        items = augment_units(net, c, p.image, p.labels, N_LABELS + 1)
        case = f"case{i:02d}"
        recs = []
        for k, it in enumerate(items):
            phi, psi = it["ddf"], it["psi_ddf"]  # voxels, [nd, *S]
            pmax = _mag(phi)[1]
            qmax = _mag(psi)[1]
            matched = psi * (pmax / max(qmax, 1e-12))
            rec = {
                "t_start": int(it["t_start"]),
                "phi": deformation_figures(phi, s),
                "psi_rand": deformation_figures(psi, s),
                "psi_rand_matched": deformation_figures(matched, s),
            }
            recs.append(rec)
            if out is not None:
                d = out / case
                write_image(_field_to_disk(phi.numpy()), d / f"s{k}_phi.nii.gz")
                write_image(_field_to_disk(psi.numpy()), d / f"s{k}_psi_rand.nii.gz")
                write_image(it["image"].numpy().T[:, :, None], d / f"s{k}_image.nii.gz")
                write_image(
                    it["onehot"].argmax(0).numpy().astype(np.int16).T[:, :, None], d / f"s{k}_labels.nii.gz"
                )
        if out is not None:
            write_image(p.image.T[:, :, None], out / case / "image.nii.gz")
            write_image(p.labels.astype(np.int16).T[:, :, None], out / case / "labels.nii.gz")
        per_case[case] = recs
        rows.append(items)
    flat = [r for recs in per_case.values() for r in recs]

    def mean(kind: str, key: str) -> float:
        return float(np.mean([r[kind][key] for r in flat]))

    summary = {
        kind: {key: mean(kind, key) for key in ("fold", "mag_mean_px", "mag_max_px", "mag_max_pct")}
        for kind in ("phi", "psi_rand", "psi_rand_matched")
    }
    block = {
        "cases": len(per_case),
        "samples_per_case": samples,
        "t_start": sorted({r["t_start"] for r in flat}),
        **summary,
        "per_case": per_case,
    }
    return block, rows


def rescore_augment(folder: str | Path, s: int) -> dict[str, float]:
    """Mean phi / Psi_rand fold and magnitude over ``augment/<case>/s<k>_*.nii.gz`` (from the files alone)."""
    acc: dict[str, list[float]] = {}
    for f in sorted(Path(folder).glob("case*/s*_phi.nii.gz")):
        for kind, path in (("phi", f), ("psi_rand", f.with_name(f.name.replace("_phi", "_psi_rand")))):
            u = torch.from_numpy(_field_from_disk(read_image(path).array))
            for k, v in deformation_figures(u, s).items():
                acc.setdefault(f"{kind}.{k}", []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


# ---------------------------------------------------------------------------------------------- figure
ZOOM = 4  # figure panels are drawn at 4x the image size (the deformation grids need the resolution)


def _grid_image(phi_vox: torch.Tensor, step: int = 8) -> np.ndarray:
    """Grid lines (every ``step`` panel pixels, i.e. every 2 voxels at ``ZOOM`` 4) warped by ``phi`` (voxels),
    drawn at ``ZOOM`` x the image size for the deformation-grid panels."""
    s = phi_vox.shape[-1] * ZOOM
    g = np.zeros((s, s), np.float32)
    g[step // 2 :: step, :] = 1.0
    g[:, step // 2 :: step] = 1.0
    up = torch.nn.functional.interpolate(
        phi_vox[None].float() * ZOOM, size=(s, s), mode="bilinear", align_corners=False
    )
    return warp(torch.from_numpy(g)[None, None], up / s, mode="bilinear", padding_mode="zeros")[0, 0].numpy()


def _zoom(img: np.ndarray) -> np.ndarray:
    return np.repeat(np.repeat(img, ZOOM, axis=0), ZOOM, axis=1)


def save_figure(path: Path, task: H.HeldoutTask, aug_rows: list[list[dict]], per_level: dict) -> None:
    """Recovery rows (one case per level: I_t, the true and the predicted recovery field components, the
    images recovered by each) and augmentation rows (image with labels, DRDM-deformed images with their
    warped labels, their deformation grids, Psi_rand for comparison)."""
    rows, titles, names = [], [], []
    shown = {}
    for case in task.images:
        t = int(task.per_case[case]["metrics"]["t"])
        if t not in shown:
            shown[t] = case
    for t, case in shown.items():
        roles = task.images[case]
        m = task.per_case[case]["metrics"]
        fdir = task.dir / case
        tgt = _field_from_disk(read_image(fdir / "field_target.nii.gz").array)
        prd = _field_from_disk(read_image(fdir / "field_pred.nii.gz").array)
        lim = float(np.abs(tgt).max()) or 1.0
        rng = (-lim, lim)
        rows.append(
            [_zoom(to_uint8(roles["input_image"], (0, 1)))]
            + [_zoom(to_uint8(f, rng)) for f in (tgt[0], prd[0], tgt[1], prd[1])]
            + [_zoom(to_uint8(roles["target"], (0, 1))), _zoom(to_uint8(roles["pred"], (0, 1)))]
        )
        titles.append(
            [
                f"I_t, t={t}",
                "psi* (H)",
                f"ours (H) cos {m['cosine']:.2f}",
                "psi* (W)",
                f"ours (W) EPE {m['epe_px']:.2f}",
                "W(I_t, psi*)",
                f"W(I_t, ours) {m['epe_px'] / max(m['epe_zero_px'], 1e-12):.2f}x zero",
            ]
        )
        names.append(f"recovery t={t}")
    for items in aug_rows[:2]:
        img0, lab0 = items[0]["original"].numpy(), items[0]["original_labels"].numpy()
        row = [_zoom(label_overlay(img0, lab0, value_range=(0, 1)))]
        tit = ["image + labels"]
        for it in items:
            row.append(
                _zoom(label_overlay(it["image"].numpy(), it["onehot"].argmax(0).numpy(), value_range=(0, 1)))
            )
            f = deformation_figures(it["ddf"], img0.shape[-1])
            tit.append(f"DRDM T'={it['t_start']} fold {100 * f['fold']:.1f}%")
        rows.append(row)
        titles.append(tit)
        names.append("DRDM samples")
        grid = [to_uint8(_grid_image(torch.zeros_like(items[0]["ddf"])), (0, 1))]
        gt = ["grid"]
        for it in items:
            f = deformation_figures(it["ddf"], img0.shape[-1])
            grid.append(to_uint8(_grid_image(it["ddf"]), (0, 1)))
            gt.append(f"phi max {f['mag_max_pct']:.0f}% of S")
        rows.append(grid)
        titles.append(gt)
        names.append("phi grids")
        psi_row, psi_t = [_zoom(to_uint8(img0, (0, 1)))], ["image"]
        for it in items[:2]:
            f = deformation_figures(it["psi_ddf"], img0.shape[-1])
            psi_row += [
                _zoom(
                    label_overlay(
                        it["noisy"].numpy(), it["noisy_onehot"].argmax(0).numpy(), value_range=(0, 1)
                    )
                ),
                to_uint8(_grid_image(it["psi_ddf"]), (0, 1)),
            ]
            psi_t += [
                f"Psi_rand T'={it['t_start']}",
                f"fold {100 * f['fold']:.1f}% max {f['mag_max_pct']:.0f}%",
            ]
        rows.append(psi_row)
        titles.append(psi_t)
        names.append("Psi_rand")
    save_grid(path, rows, titles=titles, scale=1, row_titles=names)


# ------------------------------------------------------------------------------------------------- demo
def check_resume(first: dict[str, Any], final: dict[str, Any]) -> int:
    """The demo's resume check: ``final`` (the second ``train`` call) must have resumed from a checkpoint
    whose stored step equals the step where ``first`` stopped, and ``first`` must have started fresh.
    Raises ``RuntimeError`` otherwise; returns the resumed step."""
    resumed_step = None
    if final.get("resumed_from"):
        resumed_step = int(load_checkpoint(final["resumed_from"], kind="drdm")["step"])
    if first.get("start") != 0 or final.get("start") != first["step"] or resumed_step != final.get("start"):
        raise RuntimeError(
            f"resume check failed: the first run started at {first.get('start')} and stopped at "
            f"{first['step']}; the second resumed from {final.get('resumed_from')} (stored step "
            f"{resumed_step}) at step {final.get('start')}"
        )
    return resumed_step


def run_demo(
    out: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    downstream: bool = False,
    heldout_cases: int = HELDOUT_CASES,
) -> dict[str, Any]:
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config([f"run.root={out / 'runs'}", *overrides])
    set_num_threads(cfg.run.threads)
    run_ckpts = Path(cfg.run.root) / "drdm" / cfg.run.name / "checkpoints"
    if run_ckpts.is_dir() and CheckpointManager(run_ckpts).latest() is not None:
        raise RuntimeError(f"{run_ckpts}: a previous demo run is there; use an empty --out folder")
    half = max(1, cfg.train.steps // 2)
    t_train = time.time()
    first = train(cfg, max_steps=half)  # checkpoints at `half`
    final = train(cfg)  # resumes from the run directory's latest checkpoint
    train_seconds = time.time() - t_train
    check_resume(first, final)
    ckpt = CheckpointManager(Path(final["run_dir"]) / "checkpoints").latest()
    net, cfg = load_network(ckpt)
    # recovery on held-out phantoms
    rec = recovery_task(net, cfg, out / "heldout", cases=heldout_cases)
    # augmentation with the trained model
    aug, aug_rows = augment_task(net, cfg, out / "augment")
    save_figure(out / "figure.png", rec, aug_rows, rec.extra["fields"])
    levels = forward_level_stats(build_diffusion(cfg, sampling=True), [1, 10, 20, 40, 60, 79], seeds=range(2))
    extra: dict[str, Any] = {"augment": aug, "forward_levels": levels, "margins": MARGINS}
    if downstream:
        from .evaluate import downstream_check

        extra["downstream"] = downstream_check(net, cfg)
    train_block = {
        "steps": final["step"],
        "resumed_at": final["start"],
        "resumed_from": str(final["resumed_from"]),
        "seconds": train_seconds,
        "final_loss": final["loss"],
        "dist": final["dist"],
        "ang": final["ang"],
        "reg": final["reg"],
    }
    extra["seconds"] = time.time() - t0
    return H.write_metrics(out / "metrics.json", [rec], train=train_block, **extra)


__all__ = [
    "HELDOUT_CASES",
    "LEVELS",
    "MARGINS",
    "augment_task",
    "check_resume",
    "demo_config",
    "field_scores",
    "recovery_task",
    "rescore_augment",
    "rescore_fields",
    "run_demo",
    "true_recovery",
]

"""Evaluation (spec section 10): fold ratio (negative Jacobian via core), deformation magnitude per noise level,
recovery statistics and a small downstream segmentation check (Dice with vs without DRDM augmentation)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core.metrics import dice, jacobian_determinant, negative_jacobian_fraction
from medsynth_core.phantoms import labelled_anatomy

from .config import DRDMConfig, build_diffusion
from .deform import DeformationDiffusion
from .infer import one_hot, recover, warp_labels


def field_stats(u: torch.Tensor) -> dict[str, float]:
    """Fold fraction (det(I + grad(S u)) <= 0, central differences) and |S u| mean/max in voxels and % of S."""
    s = float(u.shape[2])
    vox = u * s
    mag = vox.norm(dim=1)
    return {
        "fold": float(negative_jacobian_fraction(vox).mean()),
        "mag_mean": float(mag.mean()),
        "mag_max": float(mag.flatten(1).max(1).values.mean()),
        "mag_max_pct": float(100 * mag.flatten(1).max(1).values.mean() / s),
    }


def deformation_metrics(u_vox: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, float]:
    """The paper's deformation figures (spec section 10) of one field ``[nd, *S]`` in **voxels**: fold ratio
    (det(I + grad u) <= 0, central differences), mean / max |u| in voxels and in % of S (the first spatial
    size), and the same inside ``mask`` (``[*S]``, nonzero = inside; NaN when the mask is empty)."""
    s = float(u_vox.shape[1])
    mag = u_vox.norm(dim=0)
    det = jacobian_determinant(u_vox[None].float())[0]
    out = {
        "fold": float((det <= 0).float().mean()),
        "mag_mean_px": float(mag.mean()),
        "mag_max_px": float(mag.max()),
        "mag_mean_pct": float(100 * mag.mean() / s),
        "mag_max_pct": float(100 * mag.max() / s),
    }
    if mask is not None:
        m = torch.as_tensor(mask) != 0
        if bool(m.any()):
            out.update(
                fold_mask=float((det[m] <= 0).float().mean()),
                mag_mean_px_mask=float(mag[m].mean()),
                mag_max_px_mask=float(mag[m].max()),
                mag_max_pct_mask=float(100 * mag[m].max() / s),
            )
        else:
            out.update(
                fold_mask=float("nan"),
                mag_mean_px_mask=float("nan"),
                mag_max_px_mask=float("nan"),
                mag_max_pct_mask=float("nan"),
            )
    return out


def segmentation_metrics(pred: torch.Tensor, gt: torch.Tensor, n_classes: int) -> dict[str, float]:
    """DSC, sensitivity (TP / (TP + FN)) and precision (TP / (TP + FP)) per foreground structure
    ``1..n_classes-1`` of one integer label map pair (spec section 10, paper Table 2), plus their means
    over the structures present in ``gt``. An empty structure in ``gt`` gives NaN for it."""
    pred, gt = torch.as_tensor(pred).long(), torch.as_tensor(gt).long()
    if pred.shape != gt.shape:
        raise ValueError(f"segmentation and label shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    out: dict[str, float] = {}
    acc: dict[str, list[float]] = {"dsc": [], "sensitivity": [], "precision": []}
    for k in range(1, n_classes):
        p, g = pred == k, gt == k
        tp = float((p & g).sum())
        n_p, n_g = float(p.sum()), float(g.sum())
        if n_g == 0:
            vals = {"dsc": float("nan"), "sensitivity": float("nan"), "precision": float("nan")}
        else:
            vals = {
                "dsc": 2 * tp / (n_p + n_g),
                "sensitivity": tp / n_g,
                "precision": tp / n_p if n_p > 0 else 0.0,
            }
            for key, v in vals.items():
                acc[key].append(v)
        out.update({f"{key}_{k}": v for key, v in vals.items()})
    out.update({f"{key}_mean": float(np.mean(v)) if v else float("nan") for key, v in acc.items()})
    return out


def forward_level_stats(
    diffusion: DeformationDiffusion, levels: Sequence[int], seeds: Sequence[int] = (0,), batch: int = 1
) -> list[dict[str, float]]:
    """Per noise level t: statistics of U_img and U_lab averaged over ``seeds`` (seeded default generator)."""
    rows = []
    for t in levels:
        acc: dict[str, list[float]] = {}
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            u_img, u_lab = diffusion.sample_fields(torch.full((batch,), int(t)), batch, generator=g)
            for pre, u in (("img", u_img), ("lab", u_lab)):
                for k, v in field_stats(u).items():
                    acc.setdefault(f"{pre}_{k}", []).append(v)
        rows.append({"t": int(t), **{k: float(np.mean(v)) for k, v in acc.items()}})
    return rows


def recovery_stats(net: torch.nn.Module, cfg: DRDMConfig, x0: torch.Tensor, t_start: int) -> dict[str, float]:
    """Fold ratio and magnitude of phi and of Psi_rand for one recovery run."""
    diffusion = build_diffusion(cfg, sampling=True)
    rec = recover(
        net,
        diffusion,
        x0,
        t_start,
        None,
        cfg.diffusion.timesteps,
        cfg.model.rec_num,
        cfg.diffusion.padding_mode,
        cfg.augment.reverse_from_start,
    )
    out = {f"phi_{k}": v for k, v in field_stats(rec.phi).items()}
    out.update({f"psi_rand_{k}": v for k, v in field_stats(rec.psi_rand).items()})
    return {"t_start": int(t_start), **out}


# ------------------------------------------------------------------------------------- downstream check
class TinySegNet(torch.nn.Module):
    """A very small encoder-decoder for the downstream check (not part of DRDM)."""

    def __init__(self, n_classes: int, ndims: int = 2, width: int = 16):
        super().__init__()
        conv = getattr(torch.nn, f"Conv{ndims}d")
        self.enc = torch.nn.Sequential(
            conv(1, width, 3, 1, 1), torch.nn.ReLU(), conv(width, width, 3, 1, 1), torch.nn.ReLU()
        )
        self.down = torch.nn.Sequential(
            conv(width, 2 * width, 3, 2, 1),
            torch.nn.ReLU(),
            conv(2 * width, 2 * width, 3, 1, 1),
            torch.nn.ReLU(),
        )
        self.head = conv(3 * width, n_classes, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.enc(x)
        d = F.interpolate(self.down(h), size=h.shape[2:], mode="nearest")
        return self.head(torch.cat([h, d], 1))


def _train_seg(
    images: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int, seed: int
) -> TinySegNet:
    torch.manual_seed(seed)
    net = TinySegNet(n_classes, images.ndim - 2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (min(8, images.shape[0]),), generator=g)
        loss = F.cross_entropy(net(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def downstream_check(
    net: torch.nn.Module,
    cfg: DRDMConfig,
    n_train: int = 3,
    n_test: int = 8,
    n_aug: int = 4,
    steps: int = 150,
    t_start: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Train :class:`TinySegNet` on ``n_train`` labelled phantoms with vs without ``n_aug`` DRDM augmentations
    each (nearest one-hot labels) and report mean foreground Dice on ``n_test`` held-out phantoms."""
    s, nd, n_lab = cfg.diffusion.img_size, cfg.model.ndims, 3
    n_classes = n_lab + 1

    def phantoms(seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
        items = [labelled_anatomy((s,) * nd, n_labels=n_lab, seed=1000 + i) for i in seeds]
        return (
            torch.from_numpy(np.stack([p.image for p in items]))[:, None],
            torch.from_numpy(np.stack([p.labels for p in items])),
        )

    x_tr, y_tr = phantoms(range(n_train))
    x_te, y_te = phantoms(range(100, 100 + n_test))
    diffusion = build_diffusion(cfg, sampling=True)
    t0 = cfg.augment.start_noise_step if t_start is None else t_start
    torch.manual_seed(seed)
    # all augmentations in one batched recovery (n_aug copies of the training set)
    rec = recover(
        net,
        diffusion,
        x_tr.repeat(n_aug, 1, *([1] * nd)),
        t0,
        one_hot(y_tr, n_classes).repeat(n_aug, 1, *([1] * nd)),
        cfg.diffusion.timesteps,
        cfg.model.rec_num,
        cfg.diffusion.padding_mode,
        cfg.augment.reverse_from_start,
        "nearest",
    )
    aug_x, aug_y = [x_tr, rec.image], [y_tr, rec.labels.argmax(1)]
    out = {}
    for name, (xs, ys) in {"no_aug": (x_tr, y_tr), "drdm_aug": (torch.cat(aug_x), torch.cat(aug_y))}.items():
        seg = _train_seg(xs.float(), ys.long(), n_classes, steps, seed)
        with torch.no_grad():
            pred = seg(x_te).argmax(1)
        d = dice(one_hot(pred, n_classes), one_hot(y_te, n_classes), include_background=False)
        out[f"dice_{name}"] = float(torch.nanmean(d))
    out.update({"n_train": n_train, "n_aug_per_image": n_aug, "n_test": n_test, "seg_steps": steps})
    return out


def write_csv(path: str | Path, rows: list[dict]) -> None:
    if not rows:
        return
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in names]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        w.writerows(rows)


def write_metrics(
    out_dir: str | Path, metrics: dict, level_rows: list[dict] | None = None, case_rows: dict | None = None
) -> None:
    """``metrics.json``, ``levels.csv`` and one CSV per entry of ``case_rows`` (name -> rows)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if level_rows:
        write_csv(out / "levels.csv", level_rows)
    for name, rows in (case_rows or {}).items():
        write_csv(out / name, rows)


def mean_rows(rows: list[dict], skip: tuple[str, ...] = ("case", "sample", "t_start")) -> dict[str, float]:
    """NaN-aware mean of every numeric column."""
    keys = [k for k in rows[0] if k not in skip] if rows else []
    out = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        out[k] = float(np.nanmean(vals)) if vals and not all(np.isnan(vals)) else float("nan")
    return out


def augmentation_rows(net, cfg: DRDMConfig, images, labels=None, device: str = "cpu") -> list[dict]:
    """Per case (every 2D slice / 3D volume of ``images``) and sample: the deformation metrics of phi and
    Psi_rand, inside the label foreground too when ``labels`` is given (``drdm evaluate --images``)."""
    from .data import list_inputs, read_input, to_tensor_layout
    from .infer import _find_label, _stem, augment_units

    nd = cfg.model.ndims
    rows: list[dict] = []
    torch.manual_seed(cfg.augment.seed)
    for f in list_inputs(images):
        arr = to_tensor_layout(read_input(f).array)
        lab = None
        if labels is not None:
            lab = np.rint(
                to_tensor_layout(read_input(_find_label(f, Path(labels)), dtype=None).array)
            ).astype(np.int64)
            if lab.shape != arr.shape:
                raise ValueError(f"{f}: label shape {lab.shape} differs from image shape {arr.shape}")
        if nd == 2 and arr.ndim == 3:
            units = [
                (f"{_stem(f)}_z{z:03d}", arr[..., z], None if lab is None else lab[..., z])
                for z in range(arr.shape[-1])
            ]
        else:
            units = [(_stem(f), arr, lab)]
        for name, a, la in units:
            if np.ptp(a) == 0:
                continue  # an empty slice has nothing to deform
            n_classes = max(int(la.max()) + 1, 2) if la is not None else 0
            items = augment_units(net, cfg, a, la, n_classes, device)
            mask = None if la is None else torch.from_numpy(la > 0)
            for it in items:
                row: dict = {"case": name, "sample": int(it["k"]), "t_start": int(it["t_start"])}
                for kind, u in (("phi", it["ddf"]), ("psi_rand", it["psi_ddf"])):
                    row.update({f"{kind}_{k}": v for k, v in deformation_metrics(u.cpu(), mask).items()})
                rows.append(row)
    return rows


def segmentation_rows(segmentations, labels, n_classes: int | None = None) -> list[dict]:
    """DSC / sensitivity / precision per structure of every segmentation file against its label file."""
    from .data import list_inputs, read_input, to_tensor_layout
    from .infer import _find_label, _stem

    pairs = []
    for f in list_inputs(segmentations):
        seg = np.rint(to_tensor_layout(read_input(f, dtype=None).array)).astype(np.int64)
        gt = np.rint(to_tensor_layout(read_input(_find_label(f, Path(labels)), dtype=None).array)).astype(
            np.int64
        )
        pairs.append((_stem(f), seg, gt))
    k = n_classes or max(max(int(s.max()), int(g.max())) for _, s, g in pairs) + 1
    return [
        {"case": name, **segmentation_metrics(torch.from_numpy(s), torch.from_numpy(g), k)}
        for name, s, g in pairs
    ]


__all__ = [
    "augmentation_rows",
    "deformation_metrics",
    "downstream_check",
    "segmentation_metrics",
    "segmentation_rows",
    "field_stats",
    "forward_level_stats",
    "recovery_stats",
    "warp_labels",
    "write_metrics",
]

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

from medsynth_core.metrics import dice, negative_jacobian_fraction
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


def write_metrics(out_dir: str | Path, metrics: dict, level_rows: list[dict] | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if level_rows:
        with open(out / "levels.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(level_rows[0]))
            w.writeheader()
            w.writerows(level_rows)


__all__ = [
    "downstream_check",
    "field_stats",
    "forward_level_stats",
    "recovery_stats",
    "warp_labels",
    "write_metrics",
]

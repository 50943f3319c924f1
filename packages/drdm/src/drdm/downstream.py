"""``drdm downstream``: the paper's Table 2 protocol in small (spec section 10, issue 13).

A MONAI U-Net (``monai.networks.nets.UNet``) is trained on ``k`` labelled images per run in three arms:

- ``no_aug``: the ``k`` images as they are;
- ``bigaug``: MONAI random spatial augmentation on the fly, the BigAug-like baseline (``RandAffined``:
  rotation, scaling, translation; ``Rand2DElasticd``/``Rand3DElasticd``: smooth elastic deformation; image
  bilinear, labels nearest);
- ``drdm``: the ``k`` images plus ``copies`` DRDM samples of each, drawn with the given DRDM network
  (spec section 4: T' from ``augment.start_noise_step`` / ``augment.noise_step``, labels warped with nearest
  one-hot, ``label_mode=nearest``, whatever the checkpoint's augment config says).

Every run is scored on the same held-out images: DSC, sensitivity and precision per structure
(:func:`drdm.evaluate.segmentation_metrics`) and their means; ``seeds`` runs per (arm, k), each with its own
training subset, U-Net initialisation and augmentation draws (the same subset for every arm of a seed).
Writes ``downstream.json`` (mean +- std over seeds per arm and k), ``cases.csv`` (one row per arm, k, seed and
held-out case) and ``figure.png`` (a held-out case, its labels and each arm's prediction; one training image
and one augmented sample of each arm).

Data: labelled phantoms of the DRDM demo family (``medsynth_core.phantoms.labelled_anatomy`` with
``data.phantom_texture``; training pool and held-out seeds disjoint from the DRDM training seeds) or image +
label folders (ACDC layout ``<stem>.nii.gz`` / ``<stem>_gt.nii.gz``); in 2D every slice with a labelled
structure of a file is one sample, and ``k`` counts files (subjects, as Table 2). Everything runs at the DRDM
model's ``img_size`` (images resized anti-aliased and min-max scaled, labels nearest).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsynth_core.phantoms import labelled_anatomy

from .config import DRDMConfig, build_diffusion
from .infer import noise_steps, one_hot, recover

ARMS = ("no_aug", "bigaug", "drdm")
TRAIN_SEED = 20_000  # phantom training pools: seeds 20000 + 1000 * seed + i (DRDM training: 0..127)
TEST_SEED = 30_000  # held-out phantoms


@dataclass
class SegSettings:
    """U-Net and protocol settings (the CLI flags of ``drdm downstream``)."""

    ks: tuple[int, ...] = (2, 5)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ARMS
    steps: int = 300  # U-Net Adam steps per run
    batch: int = 8
    lr: float = 3e-3
    channels: tuple[int, ...] = (16, 32, 64)
    copies: int = 8  # DRDM samples per training image
    n_test: int = 16  # held-out phantoms
    n_labels: int = 3  # phantom structures
    # BigAug-like MONAI spatial augmentation (probabilities and ranges)
    affine_prob: float = 0.8
    rotate: float = math.pi / 6
    scale: float = 0.15
    translate: float = 0.06  # fraction of S
    elastic_prob: float = 0.8
    elastic_spacing: float = 0.25  # control-point spacing as a fraction of S
    elastic_magnitude: tuple[float, float] = (1.0, 2.0)  # in control-grid units (MONAI)


@dataclass
class SegData:
    images: torch.Tensor  # [N, 1, *S] float in [0, 1]
    labels: torch.Tensor  # [N, *S] long
    names: list[str]
    groups: list[str] = field(default_factory=list)  # subject of each sample (k counts subjects)

    def subset(self, groups: list[str]) -> SegData:
        idx = [i for i, g in enumerate(self.groups) if g in set(groups)]
        return SegData(
            self.images[idx], self.labels[idx], [self.names[i] for i in idx], [self.groups[i] for i in idx]
        )


# ----------------------------------------------------------------------------------------------- data
def phantom_data(
    size: int, ndims: int, n: int, seed: int, n_labels: int = 3, texture: float = 0.0
) -> SegData:
    items = [
        labelled_anatomy((size,) * ndims, n_labels=n_labels, seed=seed + i, texture=texture) for i in range(n)
    ]
    names = [f"phantom{seed + i}" for i in range(n)]
    return SegData(
        torch.from_numpy(np.stack([p.image for p in items]).astype(np.float32))[:, None],
        torch.from_numpy(np.stack([p.labels for p in items]).astype(np.int64)),
        names,
        list(names),
    )


def folder_data(images: str | Path, labels: str | Path, size: int, ndims: int) -> SegData:
    """Image + label folders -> samples at ``size`` per axis (2D: every slice holding a structure)."""
    from .data import list_inputs, minmax, read_input, resize, to_tensor_layout
    from .infer import _find_label, _stem

    xs, ys, names, groups = [], [], [], []
    for f in list_inputs(images):
        arr = to_tensor_layout(read_input(f).array)
        lab_path = _find_label(f, Path(labels))
        lab = np.rint(to_tensor_layout(read_input(lab_path, dtype=None).array)).astype(np.int64)
        if lab.shape != arr.shape:
            raise ValueError(f"{lab_path}: label shape {lab.shape} differs from image shape {arr.shape}")
        if arr.ndim == ndims + 1 and ndims == 2:
            units = [(f"{_stem(f)}_z{z:03d}", arr[..., z], lab[..., z]) for z in range(arr.shape[-1])]
        elif arr.ndim == ndims:
            units = [(_stem(f), arr, lab)]
        else:
            raise ValueError(f"{f}: image of shape {arr.shape} is not {ndims}D (or a stack of 2D slices)")
        for name, a, la in units:
            if not (la > 0).any() or np.ptp(a) == 0:
                continue
            x = minmax(resize(torch.from_numpy(np.asarray(a, np.float32))[None], size))
            y = resize(torch.from_numpy(la)[None], size, "label")[0]
            xs.append(x)
            ys.append(y.long())
            names.append(name)
            groups.append(_stem(f))
    if not xs:
        raise ValueError(f"{images}: no image with a labelled structure found (labels from {labels})")
    return SegData(torch.stack(xs), torch.stack(ys), names, groups)


# ------------------------------------------------------------------------------------------ augmentation
@torch.no_grad()
def drdm_samples(
    net: torch.nn.Module, cfg: DRDMConfig, data: SegData, n_classes: int, copies: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` DRDM samples of every image of ``data`` (T' = noise_steps(start, step, copies)), labels
    warped nearest one-hot. Returns images ``[N*copies, 1, *S]`` and labels ``[N*copies, *S]``."""
    a, d = cfg.augment, cfg.diffusion
    nd = data.images.ndim - 2
    diffusion = build_diffusion(cfg, sampling=True)
    steps = noise_steps(a.start_noise_step, a.noise_step, copies, d.timesteps)
    n = data.images.shape[0]
    x = data.images.repeat(copies, 1, *([1] * nd))
    y = one_hot(data.labels, n_classes).repeat(copies, 1, *([1] * nd))
    t_starts = [t for t in steps for _ in range(n)]
    torch.manual_seed(seed)
    out_x, out_y = [], []
    chunk = max(1, int(a.batch_size)) * max(1, n)
    for c0 in range(0, x.shape[0], chunk):
        sl = slice(c0, c0 + chunk)
        ts = t_starts[sl]
        if a.reverse_from_start and len(set(ts)) > 1:
            # one T' per batch with reverse_from_start
            for t in sorted(set(ts)):
                idx = [i for i, v in enumerate(ts) if v == t]
                rec = _recover(net, cfg, diffusion, x[sl][idx], t, y[sl][idx])
                out_x.append(rec.image)
                out_y.append(rec.labels.argmax(1))
            continue
        rec = _recover(net, cfg, diffusion, x[sl], ts, y[sl])
        out_x.append(rec.image)
        out_y.append(rec.labels.argmax(1))
    return torch.cat(out_x).clamp(0, 1), torch.cat(out_y).long()


def _recover(net, cfg, diffusion, x, t_start, y):
    return recover(
        net,
        diffusion,
        x.contiguous(),
        t_start,
        y.contiguous(),
        cfg.diffusion.timesteps,
        cfg.model.rec_num,
        cfg.diffusion.padding_mode,
        cfg.augment.reverse_from_start,
        "nearest",
    )


def bigaug_transform(st: SegSettings, size: int, ndims: int, seed: int):
    """MONAI random affine + elastic deformation (image bilinear, label nearest), BigAug's spatial part."""
    from monai.transforms import Compose, Rand2DElasticd, Rand3DElasticd, RandAffined

    keys = ["image", "label"]
    affine = RandAffined(
        keys,
        prob=st.affine_prob,
        rotate_range=[st.rotate] * (1 if ndims == 2 else 3),
        scale_range=[st.scale] * ndims,
        translate_range=[st.translate * size] * ndims,
        mode=("bilinear", "nearest"),
        padding_mode="zeros",
    )
    spacing = [max(2.0, st.elastic_spacing * size)] * ndims
    if ndims == 2:
        elastic = Rand2DElasticd(
            keys,
            spacing=spacing,
            magnitude_range=st.elastic_magnitude,
            prob=st.elastic_prob,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        )
    else:
        elastic = Rand3DElasticd(
            keys,
            sigma_range=(spacing[0] / 2, spacing[0]),
            magnitude_range=(st.elastic_magnitude[0] * spacing[0], st.elastic_magnitude[1] * spacing[0]),
            prob=st.elastic_prob,
            mode=("bilinear", "nearest"),
            padding_mode="zeros",
        )
    t = Compose([affine, elastic])
    t.set_random_state(seed=seed)
    return t


# ----------------------------------------------------------------------------------------------- U-Net
def build_unet(n_classes: int, ndims: int, channels: tuple[int, ...]):
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=ndims,
        in_channels=1,
        out_channels=n_classes,
        channels=tuple(channels),
        strides=(2,) * (len(channels) - 1),
        num_res_units=1,
    )


def train_unet(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    st: SegSettings,
    seed: int,
    transform=None,
) -> torch.nn.Module:
    """Adam on Dice + cross-entropy (MONAI ``DiceCELoss``), ``st.steps`` steps of ``st.batch`` samples drawn
    uniformly from ``x`` (``transform`` applied per sample on the fly)."""
    from monai.losses import DiceCELoss

    torch.manual_seed(seed)
    nd = x.ndim - 2
    net = build_unet(n_classes, nd, st.channels)
    opt = torch.optim.Adam(net.parameters(), lr=st.lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(st.steps):
        idx = torch.randint(0, x.shape[0], (st.batch,), generator=g)
        xb, yb = x[idx], y[idx][:, None].float()
        if transform is not None:
            pairs = [transform({"image": xi, "label": yi}) for xi, yi in zip(xb, yb)]
            xb = torch.stack([torch.as_tensor(p["image"]) for p in pairs]).float()
            yb = torch.stack([torch.as_tensor(p["label"]) for p in pairs]).round()
        loss = loss_fn(net(xb.as_subclass(torch.Tensor)), yb.as_subclass(torch.Tensor))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def predict(net: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([net(x[i : i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


# -------------------------------------------------------------------------------------------- protocol
def _summary(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v)), "per_seed": [float(a) for a in v]}


def run_downstream(
    net: torch.nn.Module | None,
    cfg: DRDMConfig,
    out: str | Path | None,
    st: SegSettings | None = None,
    train_pool: SegData | None = None,
    test: SegData | None = None,
    n_classes: int | None = None,
) -> dict[str, Any]:
    """The protocol; ``train_pool`` / ``test`` default to demo-family phantoms at ``cfg.diffusion.img_size``.
    ``net`` may be ``None`` only when the ``drdm`` arm is not requested."""
    from .evaluate import segmentation_metrics, write_csv

    t0 = time.time()
    st = st or SegSettings()
    bad = [a for a in st.arms if a not in ARMS]
    if bad:
        raise ValueError(f"unknown arm(s) {bad}; choose from {', '.join(ARMS)}")
    if "drdm" in st.arms and net is None:
        raise ValueError("the drdm arm needs a DRDM network (--checkpoint)")
    s, nd = cfg.diffusion.img_size, cfg.model.ndims
    tex = cfg.data.phantom_texture
    phantoms = train_pool is None
    if test is None:
        test = phantom_data(s, nd, st.n_test, TEST_SEED, st.n_labels, tex)
    if n_classes is None:
        n_classes = int(max(int(test.labels.max()), 0 if phantoms else int(train_pool.labels.max()))) + 1
        n_classes = max(n_classes, st.n_labels + 1 if phantoms else 2)
    if net is not None:
        net = net.eval()
    rows: list[dict] = []
    runs: dict[str, dict[str, dict]] = {a: {} for a in st.arms}
    examples: dict[str, Any] = {}
    timing: dict[str, float] = {a: 0.0 for a in st.arms}
    for k in st.ks:
        for seed in st.seeds:
            if phantoms:
                tr = phantom_data(s, nd, k, TRAIN_SEED + 1000 * seed, st.n_labels, tex)
            else:
                subjects = sorted(set(train_pool.groups))
                if k > len(subjects):
                    raise ValueError(f"k={k} but the training folder holds {len(subjects)} subject(s)")
                perm = np.random.default_rng(seed).permutation(len(subjects))[:k]
                tr = train_pool.subset([subjects[i] for i in sorted(perm)])
            for arm in st.arms:
                ta = time.time()
                x, y, transform = tr.images, tr.labels, None
                if arm == "drdm":
                    ax, ay = drdm_samples(net, cfg, tr, n_classes, st.copies, seed)
                    x, y = torch.cat([x, ax]), torch.cat([y, ay])
                elif arm == "bigaug":
                    transform = bigaug_transform(st, s, nd, seed)
                seg = train_unet(x, y, n_classes, st, seed, transform)
                pred = predict(seg, test.images)
                timing[arm] += time.time() - ta
                case_rows = []
                for i, name in enumerate(test.names):
                    m = segmentation_metrics(pred[i], test.labels[i], n_classes)
                    case_rows.append({"arm": arm, "k": k, "seed": seed, "case": name, **m})
                rows += case_rows
                keys = [c for c in case_rows[0] if c not in ("arm", "k", "seed", "case")]
                runs[arm].setdefault(str(k), {})[str(seed)] = {
                    c: float(np.nanmean([r[c] for r in case_rows])) for c in keys
                }
                if k == st.ks[0] and seed == st.seeds[0]:
                    sample = (x[-1, 0], y[-1]) if arm == "drdm" else (x[0, 0], y[0])
                    if transform is not None:
                        p = transform({"image": x[0], "label": y[0][None].float()})
                        sample = (
                            torch.as_tensor(p["image"])[0],
                            torch.as_tensor(p["label"])[0].round().long(),
                        )
                    examples[arm] = {"pred": pred[0], "sample": sample}
    summary: dict[str, dict] = {}
    for arm, per_k in runs.items():
        for k, per_seed in per_k.items():
            keys = next(iter(per_seed.values())).keys()
            summary.setdefault(arm, {})[k] = {
                c: _summary([per_seed[sd][c] for sd in sorted(per_seed, key=int)]) for c in keys
            }
    margins = {}
    if "drdm" in st.arms and "no_aug" in st.arms:
        margins = {
            f"k{k}": summary["drdm"][str(k)]["dsc_mean"]["mean"]
            - summary["no_aug"][str(k)]["dsc_mean"]["mean"]
            for k in st.ks
        }
    res = {
        "protocol": "paper Table 2 in small: MONAI U-Net on k labelled subjects, arms no_aug / bigaug / drdm",
        "data": "phantoms" if phantoms else "folders",
        "n_test": len(test.names),
        "n_classes": n_classes,
        "size": s,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in st.__dict__.items()},
        "summary": summary,
        "drdm_minus_no_aug_dsc": margins,
        "seconds_per_arm": timing,
        "seconds": time.time() - t0,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "downstream.json").write_text(json.dumps(res, indent=2))
        write_csv(out / "cases.csv", rows)
        save_downstream_figure(out / "figure.png", test, examples, st.arms, summary, st.ks[0])
    res["rows"] = rows
    return res


def save_downstream_figure(path: Path, test: SegData, examples: dict, arms, summary: dict, k: int) -> None:
    from medsynth_core.viz import label_overlay, save_grid

    def mid(v: torch.Tensor) -> np.ndarray:
        v = v.detach().cpu()
        return (v[..., v.shape[-1] // 2] if v.ndim == 3 else v).numpy()

    img = mid(test.images[0, 0])
    row = [label_overlay(img, mid(test.labels[0]), value_range=(0, 1))]
    titles = ["held-out labels"]
    row2, titles2 = [], []
    for arm in arms:
        if arm not in examples:
            continue
        d = summary[arm][str(k)]["dsc_mean"]["mean"]
        row.append(label_overlay(img, mid(examples[arm]["pred"]), value_range=(0, 1)))
        titles.append(f"{arm} k={k} DSC {d:.2f}")
        sx, sy = examples[arm]["sample"]
        row2.append(label_overlay(mid(sx), mid(sy), value_range=(0, 1)))
        titles2.append(f"{arm} training sample")
    row2 = [label_overlay(img, 0 * mid(test.labels[0]), value_range=(0, 1)), *row2]
    titles2 = ["held-out image", *titles2]
    save_grid(path, [*row, *row2], titles=[*titles, *titles2], ncols=len(row), scale=4)


def settings_from(**kw) -> SegSettings:
    st = copy.deepcopy(SegSettings())
    for k, v in kw.items():
        if v is not None:
            setattr(st, k, v)
    return st


__all__ = [
    "ARMS",
    "SegData",
    "SegSettings",
    "bigaug_transform",
    "build_unet",
    "drdm_samples",
    "folder_data",
    "phantom_data",
    "run_downstream",
    "train_unet",
]

"""Data (spec §1, §5): h5 writer with the official uint8 percentile mapping, h5/phantom volume readers,
the 4-slice input stack with thick-slice simulation, and the all-tasks sampler (CMS / SR / CMSR / identity).

Volumes are uint8 ``(D, H, W)`` arrays (SimpleITK order after LPS reorientation), slice axis 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medsynth_core.cli import UserError
from medsynth_core.io import H5ArrayReader
from medsynth_core.training import index_rng

from .config import DataConfig

# ------------------------------------------------------------------------------------ h5 writer


def rescale_uint8(volume: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Official ``prepare_h5`` mapping: foreground (>0) 0.5th-99.5th percentiles -> 0..255, rounded,
    clipped to [1, 255]; background stays 0 (spec §5)."""
    volume = np.asarray(volume)
    if not np.isfinite(volume).all():
        raise ValueError("volume contains NaN/Inf")
    fg = volume > 0
    if not fg.any():
        raise ValueError("volume has no foreground voxels (> 0)")
    obj = volume[fg].astype(np.float64)
    lo, hi = np.percentile(obj, percentiles[0]), np.percentile(obj, percentiles[1])
    if hi <= lo:
        raise ValueError("volume foreground is constant; cannot rescale")
    obj = np.clip(np.round((obj - lo) / (hi - lo) * 255), 1, 255)
    out = np.zeros(volume.shape, dtype=np.float64)
    out[fg] = obj
    return np.clip(np.around(out), 0, 255).astype(np.uint8)


def read_lps_array(path: str | Path) -> tuple[np.ndarray, object]:
    """NIfTI -> (z, y, x) float array after SimpleITK ``DICOMOrient('LPS')``, plus the oriented image."""
    import SimpleITK as sitk

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; pass one NIfTI volume file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    from medsynth_core.io import read_image

    # SimpleITK zero-fills a truncated file, reads NaN/Inf voxels of a NIfTI as finite numbers and squeezes
    # extra axes, all silently (issue 18): the core reader checks the file first (completeness, 3D, finite)
    read_image(path, expect_ndim=3)
    try:
        img = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
    except RuntimeError as exc:
        raise UserError(f"{path}: cannot be read as an image ({str(exc).splitlines()[0]})") from exc
    arr = sitk.GetArrayFromImage(img)
    if arr.ndim != 3:
        raise UserError(f"{path}: expected a 3D volume, got {arr.ndim}D")
    if not np.isfinite(arr).all():
        raise UserError(f"{path}: contains NaN/Inf values; clean the volume first")
    return arr, img


# ------------------------------------------------------------------------------------ sampling


def sample_task(
    rng: np.random.Generator,
    modalities: Sequence[str],
    sources: Sequence[str],
    thicknesses: Sequence[int],
    fixed_source: str | None = None,
    fixed_target: str | None = None,
) -> tuple[str, str, int]:
    """Target, source and thickness drawn uniformly and independently (IXI ``allrand``, spec §1)."""
    tgt = fixed_target if fixed_target is not None else modalities[int(rng.integers(len(modalities)))]
    src = fixed_source if fixed_source is not None else sources[int(rng.integers(len(sources)))]
    t = int(thicknesses[int(rng.integers(len(thicknesses)))])
    return tgt, src, t


def task_name(src: str, tgt: str, t: int) -> str:
    if src == tgt:
        return "identity" if t <= 1 else "SR"
    return "CMS" if t <= 1 else "CMSR"


def input_positions(i_a: int, t: int, slice_num: int = 4) -> list[int]:
    """Source slice indices i_A + t*(k - 1), k = 0..3 (spec §1)."""
    return [i_a + t * (k + 1 - slice_num // 2) for k in range(slice_num)]


def choose_ia(i_b: int, t: int, all_hr: bool, rng: np.random.Generator | None) -> int:
    """all_hr: random decimation phase, i_A = max(i_B - U{0..t-1}, 0); else i_A = floor(i_B/t)*t."""
    if t <= 1:
        return i_b
    if all_hr:
        return max(i_b - int(rng.integers(t)), 0)
    return (i_b // t) * t


def crop_or_pad(slices: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop or zero-pad the in-plane axes (last two) to ``size`` (spec §1)."""
    for ax in (-2, -1):
        n = slices.shape[ax]
        if n > size:
            start = (n - size) // 2
            slices = np.take(slices, range(start, start + size), axis=ax)
        elif n < size:
            before = (size - n) // 2
            pad = [(0, 0)] * slices.ndim
            pad[ax] = (before, size - n - before)
            slices = np.pad(slices, pad)
    return slices


def to_unit(x: np.ndarray) -> np.ndarray:
    """uint8 -> [-1, 1] (``Normalize(0,255)``: x/127.5 - 1, clipped)."""
    return np.clip(x.astype(np.float32) / 127.5 - 1.0, -1.0, 1.0)


def gather_stack(volume: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """Slices at ``positions``; outside the volume -> zero image (-1 after normalisation)."""
    d = volume.shape[0]
    out = np.zeros((len(positions), *volume.shape[1:]), dtype=volume.dtype)
    for k, p in enumerate(positions):
        if 0 <= p < d:
            out[k] = volume[p]
    return out


def make_sample(
    volumes: Mapping[str, np.ndarray],
    src: str,
    tgt: str,
    t: int,
    i_b: int,
    modalities: Sequence[str],
    size: int,
    all_hr: bool,
    rng: np.random.Generator | None,
) -> dict[str, torch.Tensor]:
    i_a = choose_ia(i_b, t, all_hr, rng)
    delta = (i_b - i_a) / t if t > 1 else 0.0
    a = gather_stack(volumes[src], input_positions(i_a, t))
    b = volumes[tgt][i_b][None]
    c = np.zeros(len(modalities), dtype=np.float32)
    c[list(modalities).index(tgt)] = 1.0
    return {
        "A": torch.from_numpy(to_unit(crop_or_pad(a, size))),
        "B": torch.from_numpy(to_unit(crop_or_pad(b, size))),
        "c": torch.from_numpy(c),
        "delta": torch.tensor([delta], dtype=torch.float32),
        "thickness": torch.tensor(t),
        "i_a": torch.tensor(i_a),
        "i_b": torch.tensor(i_b),
    }


# ------------------------------------------------------------------------------------ volume sources


def load_h5_volumes(
    root: str | Path, keys: Sequence[str], list_file: str | None = None, return_names: bool = False
):
    """Read ``root/*.h5`` (or the names in ``list_file``) with datasets ``keys`` (IXI T1/T2/PD, BraTS
    t1/t2/flair, ADNI flair/t1 or t1_lr4sr/t1_hr4sr: the layout is set by the keys)."""
    root = Path(root)
    if list_file is not None:
        lf = Path(list_file)
        if not lf.is_file():
            raise UserError(f"{lf}: split list not found")
        names = [ln.strip() for ln in lf.read_text().splitlines() if ln.strip()]
        files = [root / (n if n.endswith(".h5") else n + ".h5") for n in names]
    else:
        if not root.is_dir():
            raise UserError(
                f"{root}: data folder not found (set data.root; build it with `uni-coal prepare`)"
            )
        files = sorted(root.glob("*.h5"))
    if not files:
        raise UserError(f"{root}: no .h5 files found (build them with `uni-coal prepare`)")
    vols, names = [], []
    for f in files:
        if not f.is_file():
            raise UserError(f"{f}: listed in the split file but missing")
        with H5ArrayReader(f) as h:
            missing = [k for k in keys if k not in h]
            if missing:
                raise UserError(
                    f"{f}: missing datasets {missing} (has {sorted(h.keys())}); check data.modalities"
                )
            v = {k: h[k] for k in keys}
            names.append(f.stem)
        shapes = {k: a.shape for k, a in v.items()}
        if len(set(shapes.values())) != 1 or any(a.ndim != 3 for a in v.values()):
            raise UserError(f"{f}: datasets must be 3D of equal shape, got {shapes}")
        vols.append(v)
    return (vols, names) if return_names else vols


def phantom_volumes(
    n_subjects: int, shape: Sequence[int], modalities: Sequence[str], seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """Core brain phantoms mapped to uint8 with the official percentile mapping (T1/PD/T2 names)."""
    from medsynth_core.phantoms import brain_volumes

    names = {"T1": "T1w", "T2": "T2w", "PD": "PD", "FLAIR": "FLAIR"}
    out = []
    for s in range(n_subjects):
        ph = brain_volumes(shape=tuple(shape), seed=seed + s, contrasts=tuple(names[m] for m in modalities))
        out.append({m: rescale_uint8(ph.images[names[m]] * ph.head_mask) for m in modalities})
    return out


class SliceDataset(Dataset):
    """One item per (subject, target slice). Each item draws its task with ``index_rng(seed, epoch, i)``,
    so epochs differ and a resumed run draws the same tasks."""

    def __init__(
        self, volumes: list[dict[str, np.ndarray]], cfg: DataConfig, seed: int = 0, train: bool = True
    ):
        if not volumes:
            raise UserError("no volumes to train on")
        self.volumes, self.cfg, self.seed, self.train = volumes, cfg, seed, train
        for m in (*cfg.modalities, *cfg.sources):
            if m not in volumes[0]:
                raise UserError(f"modality '{m}' is not in the data (has {sorted(volumes[0])})")
        self.counts = np.cumsum([0] + [v[cfg.modalities[0]].shape[0] for v in volumes])
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.counts[-1])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        s = int(np.searchsorted(self.counts, idx, side="right") - 1)
        i_b = int(idx - self.counts[s])
        rng = index_rng(self.seed, self.epoch, int(idx))
        cfg = self.cfg
        tgt, src, t = sample_task(
            rng, cfg.modalities, cfg.sources, cfg.thicknesses, cfg.fixed_source, cfg.fixed_target
        )
        out = make_sample(self.volumes[s], src, tgt, t, i_b, cfg.modalities, cfg.size, cfg.all_hr, rng)
        if cfg.flip != "none" and self.train:
            # Q7: the official RandomFlip reseeds per call -> one fixed decision per subject ("subject", faithful);
            # "random" draws afresh for every item and epoch (the item's own generator, so resumes repeat it)
            frng = np.random.default_rng(self.seed * 7919 + s) if cfg.flip == "subject" else rng
            for ax in (1, 2):
                if frng.random() < 0.5:
                    out["A"] = out["A"].flip(ax)
                    out["B"] = out["B"].flip(ax)
        out["src"] = torch.tensor(list(cfg.sources).index(src) if src in cfg.sources else -1)
        return out


def build_volumes(cfg: DataConfig, split: str = "train", seed: int = 0) -> list[dict[str, np.ndarray]]:
    keys = list(dict.fromkeys([*cfg.modalities, *cfg.sources]))
    if cfg.kind == "phantom":
        vols = phantom_volumes(cfg.phantom_subjects, cfg.phantom_shape, keys, seed=seed)
        return vols[:-1] if split == "train" and len(vols) > 1 else vols[-1:]
    return load_h5_volumes(cfg.root, keys, cfg.train_list if split == "train" else cfg.test_list)


# ------------------------------------------------------------------------------------ inference planning


def output_plan(n_lr: int, t: float, out_t: float) -> list[tuple[int, float]]:
    """For an LR volume of ``n_lr`` slices of thickness ``t`` (HR units) and output spacing ``out_t``:
    output slice j at j*out_t -> (k = floor(j*out_t/t), delta = j*out_t/t - k) (``cmsreval``, spec §1)."""
    n_out = int(math.ceil(n_lr * t / out_t - 1e-9))
    plan = []
    for j in range(n_out):
        p = j * out_t / t
        k = int(math.floor(p + 1e-9))
        plan.append((k, max(p - k, 0.0) if t > 1 else 0.0))
    return plan

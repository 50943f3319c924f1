"""Volumes for the autoencoder (spec §1.3): files via medsynth-core IO or the embedded phantoms.

Intensities end in [-1, 1]: ``unit`` files (official convention, values in [0, 1]) are mapped by 2x−1;
``ct`` clips to an HU window; ``mr`` clips to percentiles (both not in the official code, spec §1.3).
Stage 1 draws random P³ crops (redrawn when all background) with in-plane flip then rot90; stage 2
returns whole volumes (cropped when larger than the stage's voxel budget, trimmed to multiples of P).
All randomness comes from ``index_rng(seed, epoch, index)``: exact resume, any worker count or rank.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medsynth_core import io as mio
from medsynth_core.training import index_rng

from .config import DataConfig


def to_model_range(arr: np.ndarray, cfg: DataConfig, source: str = "volume") -> np.ndarray:
    a = np.asarray(arr, dtype=np.float32)
    if cfg.intensity == "unit":
        lo, hi = float(a.min()), float(a.max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise mio.MedicalIOError(
                f"{source}: intensities span [{lo:.3g}, {hi:.3g}] but data.intensity=unit expects [0, 1]; "
                "use data.intensity=ct (HU window) or data.intensity=mr (percentiles), or rescale the files"
            )
        return a * 2.0 - 1.0
    if cfg.intensity == "ct":
        lo, hi = cfg.ct_window
        return (np.clip((a - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)
    if cfg.intensity == "mr":
        return np.asarray(mio.percentile_clip(a, *cfg.mr_percentiles, rescale_to=(-1.0, 1.0)), np.float32)
    return a


def load_volume(path: str | Path, cfg: DataConfig) -> tuple[np.ndarray, mio.MedicalImage]:
    """Read a 3D image, resample to ``cfg.spacing``, map intensities → ``(D, H, W)`` float32 in [-1, 1]."""
    img = mio.read_image(path, expect_ndim=3)
    if cfg.spacing is not None:
        img = mio.resample_to_spacing(img, cfg.spacing)
    return to_model_range(img.to_dhw(), cfg, str(path)), img


def list_volumes(root: str | Path) -> list[Path]:
    """Image files in ``root`` plus sub-folders holding DICOM series."""
    root = Path(root)
    files: list[Path] = []
    try:
        files = mio.list_images(root)
    except mio.MedicalIOError:
        if not root.is_dir():
            raise
    dicom = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.dcm")))
    out = sorted(set(files) | set(dicom))
    if not out:
        raise mio.MedicalIOError(
            f"{root}: no NIfTI/NRRD/MHA files or DICOM series folders found; check data.root"
        )
    return out


def split_files(files: list[Path], cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    """The official split (``VQGANDataset``): Python's ``random.seed(216); random.shuffle(files)``, the last
    ``val_files`` (40) held out. The official shuffles the unsorted ``glob`` order; ``files`` come sorted
    here, so the split is the same on every machine. With ``val_files`` or fewer files nothing is held out
    (the official would train on an empty list)."""
    files = list(files)
    random.Random(cfg.split_seed).shuffle(files)
    n_val = cfg.val_files if len(files) > cfg.val_files else 0
    return files[: len(files) - n_val], files[len(files) - n_val :]


class VolumeSource:
    """Either in-memory phantom volumes or a list of files read on demand."""

    def __init__(self, cfg: DataConfig, split: str = "train"):
        self.cfg = cfg
        if cfg.synthetic:
            from medsynth_core.phantoms import classed_volumes

            cv = classed_volumes(cfg.n_volumes, cfg.volume, n_classes=cfg.n_classes, seed=cfg.phantom_seed)
            self.arrays = [v for v in cv.volumes]
            self.files: list[Path] = []
            self.names = [f"phantom_{i:03d}" for i in range(len(self.arrays))]
        else:
            if cfg.root is None:
                raise mio.MedicalIOError(
                    "data.root is not set: pass data.root=/folder/of/volumes "
                    "(or data.synthetic=true for the phantom)"
                )
            train, val = split_files(list_volumes(cfg.root), cfg)
            self.files = train if split == "train" else val
            if not self.files:
                raise mio.MedicalIOError(f"{cfg.root}: the {split} split is empty")
            self.arrays = []
            self.names = [f.name.split(".")[0] for f in self.files]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.arrays) if self.arrays else len(self.files)

    def __getitem__(self, i: int) -> np.ndarray:
        if self.arrays:
            return self.arrays[i]
        if not self.cfg.cache_volumes:
            return load_volume(self.files[i], self.cfg)[0]
        if i not in self._cache:  # read + resample + intensity map once per file
            self._cache[i] = load_volume(self.files[i], self.cfg)[0]
        return self._cache[i]


def _augment(crop: np.ndarray, rng: np.random.Generator, flip_p: float, rot_p: float) -> np.ndarray:
    """The official augmentation on a (D, H, W) array: ``tio.RandomFlip(axes=(0, 1), p)`` flips each in-plane
    axis (torchio's x, y = our H, W) on its own draw, then ``torch.rot90(dims=(1, 2))`` (H towards W) with
    probability ``rot_p``."""
    for axis in (1, 2):
        if rng.random() < flip_p:
            crop = np.flip(crop, axis=axis)
    if rng.random() < rot_p:
        crop = np.rot90(crop, k=1, axes=(1, 2))
    return np.ascontiguousarray(crop)


class PatchDataset(Dataset):
    """Stage 1: one random P³ crop per volume per epoch, (1, P, P, P) float32."""

    def __init__(
        self,
        source: VolumeSource,
        patch: int,
        seed: int = 0,
        flip_p: float = 0.5,
        rot_p: float = 0.5,
        max_redraws: int = 50,
    ):
        self.source, self.patch, self.seed = source, patch, seed
        self.flip_p, self.rot_p, self.max_redraws = flip_p, rot_p, max_redraws
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        vol = self.source[i]
        p = self.patch
        if any(s < p for s in vol.shape):
            raise ValueError(
                f"volume {self.source.names[i]} has shape {vol.shape}, smaller than the "
                f"{p}³ training patch; lower data.patch or resample the data"
            )
        rng = index_rng(self.seed, self.epoch, i)
        for _ in range(self.max_redraws):
            o = [int(rng.integers(0, s - p + 1)) for s in vol.shape]
            crop = vol[o[0] : o[0] + p, o[1] : o[1] + p, o[2] : o[2] + p]
            if (crop > -1.0).any():  # official: redraw crops whose raw [0, 1] sum is 0
                break
        return torch.from_numpy(_augment(crop, rng, self.flip_p, self.rot_p)).unsqueeze(0)


def stage2_shape(shape: tuple[int, ...], cfg: DataConfig) -> tuple[int, ...]:
    """Target shape for a stage-2 volume: the crop when over budget, then trimmed to multiples of P."""
    if int(np.prod(shape)) > cfg.stage2_max_voxels:
        shape = tuple(min(s, c) for s, c in zip(shape, cfg.stage2_crop))
    out = tuple((s // cfg.patch) * cfg.patch for s in shape)
    if min(out) == 0:
        raise ValueError(f"volume of shape {shape} is smaller than the {cfg.patch}³ patch in some dimension")
    return out


class WholeVolumeDataset(Dataset):
    """Stage 2: whole volumes (1, D, H, W), randomly cropped to :func:`stage2_shape`; with ``augment`` the
    stage-1 flips and rot90 follow (the official stage-2 training set augments too). A rot90 swaps H and W:
    with ``batch`` > 1 it is applied to in-plane square crops only, so a batch still stacks (the official
    trains stage 2 at batch 1)."""

    def __init__(
        self, source: VolumeSource, cfg: DataConfig, seed: int = 0, augment: bool = False, batch: int = 1
    ):
        self.source, self.cfg, self.seed, self.augment, self.batch = source, cfg, seed, augment, batch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> torch.Tensor:
        vol = self.source[i]
        t = stage2_shape(vol.shape, self.cfg)
        rng = index_rng(self.seed, self.epoch, i, 2)
        o = [int(rng.integers(0, s - n + 1)) for s, n in zip(vol.shape, t)]
        crop = vol[o[0] : o[0] + t[0], o[1] : o[1] + t[1], o[2] : o[2] + t[2]]
        if self.augment:
            rot_p = self.cfg.rot_p if self.batch == 1 or t[1] == t[2] else 0.0
            crop = _augment(crop, rng, self.cfg.flip_p, rot_p)
        return torch.from_numpy(np.ascontiguousarray(crop)).unsqueeze(0)

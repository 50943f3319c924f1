"""Training data (spec §2): 4D SAX cine NIfTIs → every (frame, slice) pair as one [-1,1] sample.

Per file: optional N4, clip to [0, p98 of the whole 4D array (zeros included, as the fork)], divide by p98, map
to [-1,1]; no augmentation and no resize (the file must already be image_size²). Subject-level train/val split
(the fork used val = train, spec §5). The synthetic source uses ``medsynth_core.phantoms.cardiac_cine``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medsynth_core.cli import UserError
from medsynth_core.io import list_images, read_image

from .config import Config, DataConfig
from .geometry import ijk_to_dhw_affine
from .infer import n4_correct, percentile_normalise


def load_cine(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D (Z,H,W) or 4D (T,Z,H,W, SimpleITK order) SAX file → ``((T,S,H,W) float64, (s,h,w) affine)``."""
    img = read_image(path, dtype=np.float64, expect_ndim=(3, 4))
    arr = img.to_dhw()
    if arr.ndim == 3:
        arr = arr[None]
    return arr, ijk_to_dhw_affine(img.affine)


def normalise_cine(arr: np.ndarray, cfg: DataConfig) -> np.ndarray:
    """[0,1] intensities (map to [-1,1] with ``2x−1`` for the network)."""
    if cfg.n4:
        arr = np.stack([n4_correct(f) for f in arr])
    return percentile_normalise(arr, cfg.percentile, cfg.include_zeros_in_percentile)


class SliceDataset(Dataset):
    """All (frame, slice) 2D images of a list of (T,S,H,W) [0,1] arrays, returned as (1,H,W) in [-1,1]."""

    def __init__(
        self,
        volumes: list[np.ndarray],
        image_size: int,
        drop_empty: bool = False,
        names: list[str] | None = None,
    ):
        self.slices: list[np.ndarray] = []
        for i, v in enumerate(volumes):
            name = names[i] if names else f"volume {i}"
            if v.ndim != 4:
                raise UserError(f"{name}: expected a (T, S, H, W) cine array, got shape {v.shape}")
            if v.shape[-2:] != (image_size, image_size):
                raise UserError(
                    f"{name}: slices are {v.shape[-2]}x{v.shape[-1]} but model.image_size is "
                    f"{image_size}; crop/resample the data to {image_size}x{image_size} first"
                )
            for f in range(v.shape[0]):
                for s in range(v.shape[1]):
                    sl = v[f, s]
                    if drop_empty and not np.any(sl):
                        continue
                    self.slices.append((sl * 2.0 - 1.0).astype(np.float32))

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.slices[i])[None]


def phantom_volumes(
    n_subjects: int,
    n_frames: int,
    n_slices: int,
    size: int,
    seed0: int = 1,
    pixel_spacing: float = 1.5,
    slice_spacing: float = 8.0,
    supersample: int = 1,
    slice_offset: float = 0.0,
) -> list[np.ndarray]:
    """Seeded cardiac phantoms (T,S,H,W) in [0,1]; seeds ``seed0..seed0+n−1`` (the demo holds out seed 0 and
    seeds >= 100). ``cardiac_cine`` scales the anatomy to the stack extent ``n_slices·slice_spacing`` and the
    field of view ``size·pixel_spacing``; ``slice_offset`` shifts the stack along the long axis and
    ``supersample`` renders every pixel as the mean over its in-plane footprint."""
    from medsynth_core.phantoms import cardiac_cine

    return [
        cardiac_cine(
            n_frames=n_frames,
            n_slices=n_slices,
            size=size,
            slice_spacing=slice_spacing,
            pixel_spacing=pixel_spacing,
            seed=seed0 + i,
            lax_size=8,
            supersample=supersample,
            slice_offset=slice_offset,
        ).sax.astype(np.float64)
        for i in range(n_subjects)
    ]


def subject_split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Split by subject (never by slice)."""
    if val_fraction <= 0 or len(items) < 2:
        return list(items), []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, int(round(val_fraction * len(items))))
    val = [items[i] for i in sorted(order[:n_val])]
    train = [items[i] for i in sorted(order[n_val:])]
    return train, val


def build_datasets(cfg: Config) -> tuple[SliceDataset, SliceDataset | None]:
    d = cfg.data
    size = cfg.model.image_size
    if d.source == "phantom":
        vols = phantom_volumes(
            d.phantom_subjects,
            d.phantom_frames,
            d.phantom_slices,
            size,
            pixel_spacing=d.phantom_pixel_spacing,
            slice_spacing=d.phantom_slice_spacing,
            supersample=d.phantom_supersample,
            slice_offset=d.phantom_slice_offset,
        )
        names = [f"phantom seed {i + 1}" for i in range(len(vols))]
    else:
        if not d.root:
            raise UserError("data.root is empty: set data.root=/path/to/sax_niftis (or data.source=phantom)")
        files = list_images(d.root, patterns=(d.pattern,))[: d.max_files]
        vols, names = [], []
        for f in files:
            arr, _ = load_cine(f)
            vols.append(normalise_cine(arr, d))
            names.append(str(f))
    pairs = list(zip(vols, names))
    tr, va = subject_split(pairs, d.val_fraction, cfg.run.seed)
    train = SliceDataset([v for v, _ in tr], size, d.drop_empty_slices, [n for _, n in tr])
    if len(train) == 0:
        raise UserError(f"no training slices found (data.source={d.source}, root={d.root!r})")
    val = SliceDataset([v for v, _ in va], size, d.drop_empty_slices, [n for _, n in va]) if va else None
    return train, val

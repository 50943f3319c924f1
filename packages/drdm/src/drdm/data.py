"""Training data and the training-time augmentations of DRDM (spec sections 7 and 9)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from medsynth_core.io import DEFAULT_IMAGE_PATTERNS, MedicalIOError, read_image
from medsynth_core.phantoms import labelled_anatomy

from .config import DRDMConfig

NPY_PATTERN = "*.npy"  # official LCT source volumes (Data/Src_data/CTLung_processed/*.npy)


def is_dicom_series(path: str | Path) -> bool:
    """A folder holding at least one DICOM series (SimpleITK / GDCM)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_dir():
        return False
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    except Exception:  # noqa: BLE001 - unreadable folder: not a series
        return False


def list_inputs(folder: str | Path, npy: bool = False) -> list[Path]:
    """Sorted inputs of ``folder``: image files (NIfTI, NRRD, MHA/MHD; ``.npy`` too with ``npy``) and
    DICOM series (each sub-folder holding one is one input; a folder that is itself a series is one input).
    Every path can be read with :func:`read_input`."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "folder does not exist"
        raise MedicalIOError(f"{folder}: {problem}; check the data path (it must be a folder of images)")
    patterns = tuple(DEFAULT_IMAGE_PATTERNS) + ((NPY_PATTERN,) if npy else ())
    found = {p for pat in patterns for p in folder.glob(pat) if p.is_file() and not p.name.startswith(".")}
    found |= {p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and is_dicom_series(p)}
    if not found and is_dicom_series(folder):
        return [folder]
    if not found:
        raise MedicalIOError(
            f"{folder}: folder holds no image (looked for {', '.join(patterns)} and DICOM series "
            "sub-folders); put the images there or point to the right folder"
        )
    return sorted(found)


def read_input(path: str | Path, dtype=np.float32):
    """One input of :func:`list_inputs` as a :class:`medsynth_core.io.MedicalImage` (``.npy``: identity
    affine, as the official LCT loader has no geometry)."""
    from medsynth_core.io import MedicalImage

    path = Path(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path)
        except Exception as exc:  # noqa: BLE001
            raise MedicalIOError(f"{path}: cannot be read as a numpy array ({exc})") from exc
        arr = np.asarray(arr, dtype=dtype if dtype is not None else arr.dtype)
        if not np.all(np.isfinite(arr)):
            raise MedicalIOError(f"{path}: contains NaN/Inf; clean the volume")
        return MedicalImage(arr, np.eye(4), min(arr.ndim, 3))
    return read_image(path, dtype=dtype)


def remove_background(img: np.ndarray, num_bin: int = 256) -> np.ndarray:
    """``Dataloader.dataloader_utils.remove_background`` of the official code (one channel, no blur;
    spec section 9): the most frequent value among the integer bins ``[0,1), ..., [num_bin-2, num_bin-1]``
    is taken, and the pixels **exactly equal** to that bin's integer value are set to the minimum of the
    other pixels (typically the zero background is lifted to the darkest tissue value before min-max)."""
    img = np.asarray(img)
    hist, _ = np.histogram(img.ravel(), bins=range(num_bin))
    common = int(np.argmax(hist))
    mask = img == common
    if mask.all() or not mask.any():  # the official code fails on an all-background image (min of nothing)
        return img.copy()
    out = img.copy()
    out[mask] = img[~mask].min()
    return out


def to_tensor_layout(array: np.ndarray) -> np.ndarray:
    """Disk-order array ``(i, j[, k])`` used as tensor ``(H, W[, D])`` unchanged: the official loader feeds the
    nibabel array as is, and the released CMR weights (and the spec fingerprint) assume this order."""
    return np.ascontiguousarray(array)


def minmax(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def resize(x: torch.Tensor, size: int, mode: str = "image") -> torch.Tensor:
    """Resize ``[C, *spatial]`` to ``size`` per axis: images (bi/trilinear, anti-aliased in 2D) or labels (nearest)."""
    nd = x.ndim - 1
    if all(int(s) == size for s in x.shape[1:]):
        return x
    if mode == "label":
        return F.interpolate(x[None].float(), [size] * nd, mode="nearest")[0].to(x.dtype)
    interp = "bilinear" if nd == 2 else "trilinear"
    return F.interpolate(x[None].float(), [size] * nd, mode=interp, align_corners=False, antialias=nd == 2)[0]


class PhantomImages(Dataset):
    """``labelled_anatomy`` phantom images ``[1, *S]`` in [0, 1] (seeds 0..count-1)."""

    def __init__(self, ndims: int, size: int, count: int, seed_offset: int = 0, texture: float = 0.0):
        self.items = [
            labelled_anatomy((size,) * ndims, n_labels=3, seed=seed_offset + i, texture=texture)
            for i in range(count)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.items[i].image.copy())[None]


class FolderImages(Dataset):
    """Images of a folder (NIfTI, NRRD, MHA, DICOM series, ``.npy``): 2D slices (every slice of 3D files) or
    3D volumes. Official CMR loader order (spec section 9): resize to ``S`` per axis, ``remove_background``
    (2D), min-max. ``preprocessed`` files (the official ``*_resize`` / ``*processed`` folders) are used as
    they are, as the official loaders do."""

    def __init__(
        self,
        root: str | Path,
        ndims: int,
        size: int,
        slices: bool = True,
        normalise: str = "minmax",
        rm_background: bool = True,
        preprocessed: bool = False,
    ):
        files = list_inputs(root, npy=True)
        self.ndims, self.size, self.normalise = ndims, size, normalise
        self.items: list[torch.Tensor] = []
        for f in files:
            arr = to_tensor_layout(read_input(f).array)
            if arr.ndim == ndims + 1 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if ndims == 2 and arr.ndim == 3 and slices:
                vols = [arr[..., k] for k in range(arr.shape[-1])]
            elif arr.ndim == ndims:
                vols = [arr]
            else:
                raise MedicalIOError(
                    f"{f}: image of shape {arr.shape} cannot be used as {ndims}D training data; "
                    f"set model.ndims or data.slices to match the files"
                )
            for v in vols:
                x = torch.from_numpy(np.asarray(v, np.float32))[None]
                if preprocessed:
                    if any(int(n) != size for n in x.shape[1:]):
                        raise MedicalIOError(
                            f"{f}: data.preprocessed=true but the image is {tuple(x.shape[1:])}, not "
                            f"{size} per axis; set data.preprocessed=false to resize and scale it"
                        )
                    self.items.append(x)
                    continue
                x = resize(x, size)
                if rm_background and ndims == 2:
                    x = torch.from_numpy(remove_background(x.numpy()))
                if normalise == "minmax":
                    x = minmax(x)
                self.items.append(x)
        if not self.items:
            raise MedicalIOError(f"{root}: no usable images found")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


def build_dataset(cfg: DRDMConfig) -> Dataset:
    if cfg.data.source == "phantom":
        return PhantomImages(
            cfg.model.ndims, cfg.diffusion.img_size, cfg.data.phantom_count, texture=cfg.data.phantom_texture
        )
    d = cfg.data
    if not d.root:
        raise MedicalIOError("data.root is empty: set data.root=/path/to/images (or data.source=phantom)")
    if not Path(d.root).is_dir():
        hint = f" (the official {d.official} config reads it there)" if d.official else ""
        raise MedicalIOError(
            f"data.root={d.root}: training folder does not exist{hint}; pass data.root=/path/to/images, "
            "or data.source=phantom to train on phantoms"
        )
    return FolderImages(
        d.root,
        cfg.model.ndims,
        cfg.diffusion.img_size,
        d.slices,
        d.normalise,
        rm_background=d.remove_background,
        preprocessed=d.preprocessed,
    )


# ----------------------------------------------------------------------------------------- augmentation
def _transformer_2d():
    import torchvision.transforms as T

    # utils.get_transformer (spec section 7): RandomAffine(±180°, ±12.5%, bilinear, fill 0) p=0.8, vflip, autocontrast
    return T.Compose(
        [
            T.RandomApply(
                [
                    T.RandomAffine(
                        degrees=180,
                        translate=[0.125, 0.125],
                        fill=0.0,
                        interpolation=T.InterpolationMode.BILINEAR,
                    )
                ],
                0.8,
            ),
            T.RandomVerticalFlip(p=0.5),
            T.RandomAutocontrast(p=0.5),
        ]
    )


def random_rotation_3d(x: torch.Tensor) -> torch.Tensor:
    """Rotation about a random axis (U(-1,1)^3 normalised) by U(-pi, pi), numpy RNG, trilinear, zero fill."""
    axis = np.random.uniform(-1, 1, 3)  # noqa: NPY002  (official draws from the global numpy RNG)
    axis = axis / (np.linalg.norm(axis) + 1e-12)
    angle = np.random.uniform(-math.pi, math.pi)  # noqa: NPY002
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)
    theta = torch.zeros(x.shape[0], 3, 4, dtype=x.dtype, device=x.device)
    theta[:, :, :3] = torch.as_tensor(rot, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def random_resized_crop_3d(x: torch.Tensor) -> torch.Tensor:
    """Cube of side fraction U(0.6, 1) at a random offset, resized back trilinearly (RandomResizedCrop3D)."""
    s = x.shape[2]
    side = max(2, int(round(s * np.random.uniform(0.6, 1.0))))  # noqa: NPY002
    off = [int(np.random.randint(0, s - side + 1)) for _ in range(3)]  # noqa: NPY002
    crop = x[:, :, off[0] : off[0] + side, off[1] : off[1] + side, off[2] : off[2] + side]
    return F.interpolate(crop, [s] * 3, mode="trilinear", align_corners=False)


def intensity_augment(x: torch.Tensor, s: float) -> torch.Tensor:
    """a, b ~ U(0, 2s): x <- clamp(x - a, 0, 1 - a - b); x <- x N(1, s) + N(0, s) (scalars, numpy RNG)."""
    a = np.random.uniform(0, 2 * s)  # noqa: NPY002
    up = 1 - np.random.uniform(0, 2 * s) - a  # noqa: NPY002
    x = torch.clamp(x - a, min=0.0, max=up)
    return x * float(np.random.normal(1, s)) + float(np.random.normal(0, s))  # noqa: NPY002


class TrainAugment:
    """Geometric (2D affine/flip/autocontrast; 3D p=0.6 rotation + p=0.8 resized crop) then intensity aug."""

    def __init__(self, ndims: int, noise_scale: float, geometric: bool = True):
        self.ndims, self.noise_scale, self.geometric = ndims, noise_scale, geometric
        self.t2d = _transformer_2d() if ndims == 2 and geometric else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.geometric:
            if self.ndims == 2:
                x = self.t2d(x)
            else:
                if np.random.uniform(0, 1) < 0.6:  # noqa: NPY002
                    x = random_rotation_3d(x)
                if torch.rand(1).item() < 0.8:
                    x = random_resized_crop_3d(x)
        if self.noise_scale > 0:
            x = intensity_augment(x, self.noise_scale)
        return x

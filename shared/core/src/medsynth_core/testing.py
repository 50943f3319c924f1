"""Bad inputs every package's verbs must refuse in one line (issue 18): generators of damaged image files
and checkpoints, so a package's tests (and a new package's) run the same matrix against its CLI.

Each generator writes its files under ``folder`` and returns ``{case: path}``. The expectation for every
case is the same: exit code 2 and exactly one line on stderr that names the path, never a traceback.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

IMAGE_CASES = ("missing", "zero_bytes", "cut_half", "no_trailer", "flipped_byte", "cut_plain", "text", "nan",
               "inf", "five_d", "empty_folder")  # fmt: skip
CHECKPOINT_CASES = ("missing_ckpt", "zero_bytes_ckpt", "random_bytes_ckpt", "nifti_as_ckpt", "bare_state_dict",
                    "other_kind_ckpt", "cut_ckpt")  # fmt: skip


def _write_nifti(path: Path, arr: np.ndarray) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr), np.eye(4)), str(path))
    return path


def bad_image_files(folder: str | os.PathLike, shape: tuple[int, ...] = (16, 16, 4)) -> dict[str, Path]:
    """Damaged or unusable image files of a 3D float32 volume of ``shape``: missing, zero bytes, cut in
    half, gzip trailer gone, one byte flipped (CRC), plain .nii cut short, text under an image name, NaN,
    Inf, a 5D array, a folder with no image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    vol = rng.random(shape).astype(np.float32)
    good = _write_nifti(folder / "good.nii.gz", vol)
    raw = gzip.decompress(good.read_bytes())
    packed = good.read_bytes()
    out: dict[str, Path] = {"missing": folder / "missing.nii.gz"}

    def put(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        out[name.split(".")[0]] = folder / name

    put("zero_bytes.nii.gz", b"")
    put("cut_half.nii.gz", packed[: len(packed) // 2])
    put("no_trailer.nii.gz", packed[:-8])
    flipped = bytearray(packed)
    flipped[len(flipped) // 2] ^= 0xFF
    put("flipped_byte.nii.gz", bytes(flipped))
    put("cut_plain.nii", raw[:-200])
    put("text.nii.gz", b"this is not an image\n")
    nan = vol.copy()
    nan[0, 0, 0] = np.nan
    out["nan"] = _write_nifti(folder / "nan.nii.gz", nan)
    inf = vol.copy()
    inf[1, 1, 1] = np.inf
    out["inf"] = _write_nifti(folder / "inf.nii.gz", inf)
    out["five_d"] = _write_nifti(folder / "five_d.nii.gz", vol.reshape(*shape, 1, 1)[..., None])
    (folder / "empty_folder").mkdir(exist_ok=True)
    out["empty_folder"] = folder / "empty_folder"
    good.unlink()
    assert tuple(out) == IMAGE_CASES
    return out


def bad_checkpoint_files(folder: str | os.PathLike, good: str | os.PathLike | None = None) -> dict[str, Path]:
    """Checkpoints that cannot be used: missing, zero bytes, random bytes, a NIfTI under a ``.pt`` name, a
    bare state dict (a foreign ``.pth``), a medsynth checkpoint of another kind, and (given a ``good``
    checkpoint) that file cut in half."""
    import torch

    from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {"missing_ckpt": folder / "missing.pt"}
    (folder / "zero.pt").write_bytes(b"")
    out["zero_bytes_ckpt"] = folder / "zero.pt"
    (folder / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    out["random_bytes_ckpt"] = folder / "random.pt"
    out["nifti_as_ckpt"] = _write_nifti(folder / "image.nii.gz", np.zeros((4, 4, 4), np.float32))
    (folder / "image.nii.gz").rename(folder / "image.pt")
    out["nifti_as_ckpt"] = folder / "image.pt"
    atomic_torch_save({"conv.weight": torch.zeros(2, 2)}, folder / "state_dict.pth")
    out["bare_state_dict"] = folder / "state_dict.pth"
    net = torch.nn.Linear(2, 2)
    atomic_torch_save(build_checkpoint(kind="another-package", step=1, models={"net": net}), folder / "other.pt")
    out["other_kind_ckpt"] = folder / "other.pt"
    if good is not None:
        data = Path(good).read_bytes()
        (folder / "cut.pt").write_bytes(data[: len(data) // 2])
        out["cut_ckpt"] = folder / "cut.pt"
    return out


def state_dict_mismatch(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> tuple[float, float]:
    """Share of the floating-point elements of state dict ``a`` outside ``rtol``/``atol`` of ``b`` (same
    keys), and the largest absolute difference: compares two training runs that should agree (issue 18's
    deterministic DDP tests), where Adam may turn a few rounding-level gradients into full steps."""
    pairs = [(v.float(), b[k].float()) for k, v in a.items() if v.is_floating_point()]
    n = sum(int(((v - w).abs() > atol + rtol * w.abs()).sum()) for v, w in pairs)
    return n / sum(v.numel() for v, _ in pairs), max(float((v - w).abs().max()) for v, w in pairs)

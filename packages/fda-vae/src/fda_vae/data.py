"""Data: paired 2D phase slices, the lesion-stratified split, the phantom stand-in, the LLD-MMRI extractor.

Layout (spec §4): ``root/<phase>/<patientID>_<sliceIdx>.nii.gz``, one 2D slice per file. The patient ID
is the file name up to the first ``_``. Pairs are the keys present in both phase folders.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from medsynth_core.cli import UserError
from medsynth_core.io import MedicalIOError, list_images, minmax_to_range, read_image

from .pairs import pair_keys, patient_of, slice_key

log = logging.getLogger("fda_vae")


def resize_and_normalize(arr: np.ndarray, size: int = 256, source: str = "array") -> np.ndarray:
    """Bilinear zoom (``scipy.ndimage.zoom``, order 1) to exactly size×size (aspect not kept), then
    min-max to [−1, 1] (a constant slice becomes all zeros); returns float32 (1, size, size)."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise UserError(
            f"{source}: expected a 2D slice, got shape {arr.shape}; extract 2D slices first "
            "(fda-vae prepare) or squeeze singleton axes"
        )
    if not np.all(np.isfinite(arr)):
        raise UserError(f"{source}: slice contains NaN/Inf; clean the file")
    if arr.shape != (size, size):
        arr = ndimage.zoom(arr, (size / arr.shape[0], size / arr.shape[1]), order=1)
        if arr.shape != (size, size):  # rounding guard
            arr = arr[:size, :size]
    return minmax_to_range(arr, -1.0, 1.0)[None].astype(np.float32)


# ----------------------------------------------------------------------------------------- split
def parse_lesion_list(path: str | os.PathLike) -> list[list[str]]:
    """``lesion_patient_list.txt`` → one list of patient IDs per class, in file order.

    ``病灶分类 k:`` starts class k; ``病人 ID: <id>`` adds a patient. Raises when a patient is in two classes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: lesion patient list not found (data.split_file)")
    classes: list[list[str]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if re.match(r"^病灶分类\s*\d+\s*[:：]", s):
            classes.append([])
        elif m := re.match(r"^病人\s*ID\s*[:：]\s*(\S+)", s):
            if not classes:
                raise UserError(f"{path}:{lineno}: patient line before the first '病灶分类 k:' header")
            classes[-1].append(m.group(1))
    if not classes:
        raise UserError(f"{path}: no '病灶分类 k:' class header found; is this lesion_patient_list.txt?")
    seen: dict[str, int] = {}
    for k, ids in enumerate(classes):
        for pid in set(ids):
            if pid in seen:
                raise UserError(f"{path}: patient {pid} is listed in classes {seen[pid]} and {k}")
            seen[pid] = k
    return classes


def stratified_split(
    classes: Sequence[Sequence[str]], ratio: float = 0.2, seed: int = 42
) -> tuple[list[str], list[str], list[list[str]]]:
    """Official split (mri_dataset_v2.py:58,135-156): per class in file order, sort the unique IDs,
    shuffle with Python ``random`` seeded ``seed`` once, take the first max(1, ⌊ratio·n⌋) as val.

    A local ``random.Random`` replaces the official global reseed (spec §6.6); the draws are identical.
    Returns (train IDs, val IDs, val IDs per class).
    """
    rng = random.Random(seed)
    train, val, per_class = [], [], []
    for ids in classes:
        ids = sorted(set(ids))
        rng.shuffle(ids)
        n_val = max(1, int(len(ids) * ratio))
        per_class.append(ids[:n_val])
        val.extend(ids[:n_val])
        train.extend(ids[n_val:])
    return train, val, per_class


def three_way_split(
    classes: Sequence[Sequence[str]], val_ratio: float = 0.2, test_ratio: float = 0.1, seed: int = 42
) -> tuple[list[str], list[str], list[str]]:
    """Optional 3-way split (spec §6.7): the official val patients stay exactly the same; per class the
    next max(1, ⌊test_ratio·n⌋) shuffled patients become a held-out test set, the rest train."""
    rng = random.Random(seed)
    train, val, test = [], [], []
    for ids in classes:
        ids = sorted(set(ids))
        rng.shuffle(ids)
        n_val = max(1, int(len(ids) * val_ratio))
        n_test = max(1, int(len(ids) * test_ratio))
        val.extend(ids[:n_val])
        test.extend(ids[n_val : n_val + n_test])
        train.extend(ids[n_val + n_test :])
    return train, val, test


# --------------------------------------------------------------------------------------- datasets
def find_pairs(
    root: str | os.PathLike, phase_a: str, phase_b: str, sort: bool = True
) -> list[tuple[str, Path, Path]]:
    """(key, path A, path B) for every slice key present in both phase folders.

    ``sort=True`` (spec §6.5 fix) gives the same list on every rank; ``False`` keeps the official
    set-iteration order, which depends on ``PYTHONHASHSEED``.
    """
    root = Path(root)
    files = {}
    for ph in (phase_a, phase_b):
        folder = root / ph
        if not folder.is_dir():
            raise UserError(
                f"{folder}: phase folder missing; expected {root}/<phase>/<patient>_<slice>.nii.gz "
                f"for data.phase_a={phase_a!r} and data.phase_b={phase_b!r}"
            )
        try:
            files[ph] = {slice_key(p): p for p in list_images(folder, ("*.nii.gz", "*.nii"))}
        except MedicalIOError as exc:
            raise UserError(str(exc)) from exc
    keys = pair_keys(files[phase_a], files[phase_b], sort)
    if not keys:
        raise UserError(
            f"{root}: no slice key is present in both {phase_a}/ and {phase_b}/; "
            "file names must match, e.g. MR123_40.nii.gz in both folders"
        )
    return [(k, files[phase_a][k], files[phase_b][k]) for k in keys]


class SlicePairDataset(Dataset):
    """Paired slices of two phases. Items: ``{"a": (1,S,S), "b": (1,S,S), "key": str}`` in [−1,1]."""

    def __init__(
        self,
        root: str | os.PathLike,
        phase_a: str,
        phase_b: str,
        image_size: int = 256,
        patients: Sequence[str] | None = None,
        sort: bool = True,
    ):
        pairs = find_pairs(root, phase_a, phase_b, sort)
        if patients is not None:
            keep = set(patients)
            pairs = [p for p in pairs if patient_of(p[0]) in keep]
            if not pairs:
                raise UserError(f"{root}: none of the {len(keep)} split patients has a slice pair")
        self.pairs = pairs
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def _read(self, path: Path) -> np.ndarray:
        try:
            img = read_image(path, expect_ndim=2)
        except MedicalIOError as exc:
            raise UserError(str(exc)) from exc
        # SimpleITK order (rows, cols), as the official GetArrayFromImage
        return resize_and_normalize(img.to_dhw(), self.image_size, str(path))

    def __getitem__(self, i: int) -> dict[str, Any]:
        key, pa, pb = self.pairs[i]
        return {"a": torch.from_numpy(self._read(pa)), "b": torch.from_numpy(self._read(pb)), "key": key}


class ArrayPairDataset(Dataset):
    """In-memory pairs (phantoms, tests); the same per-slice preprocessing as the folder dataset."""

    def __init__(self, a: np.ndarray, b: np.ndarray, keys: Sequence[str], image_size: int):
        if len(a) != len(b) or len(a) != len(keys):
            raise ValueError("a, b and keys must have the same length")
        self.a = np.stack([resize_and_normalize(x, image_size) for x in a])
        self.b = np.stack([resize_and_normalize(x, image_size) for x in b])
        self.keys = list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"a": torch.from_numpy(self.a[i]), "b": torch.from_numpy(self.b[i]), "key": self.keys[i]}


def phantom_datasets(cfg) -> tuple[ArrayPairDataset, ArrayPairDataset]:
    """Train / val sets from ``medsynth_core.phantoms.contrast_phase_slices`` (two phases, e.g. venous→delay)."""
    from medsynth_core.phantoms import contrast_phase_slices

    d = cfg.data
    out = []
    for n, seed, tag in ((d.phantom_train, d.phantom_seed, "T"), (d.phantom_val, d.phantom_seed + 1, "V")):
        ph = contrast_phase_slices(n=n, size=d.phantom_size, phases=tuple(d.phantom_phases), seed=seed)
        keys = [f"PH{tag}{i:04d}_{0:03d}" for i in range(n)]
        out.append(
            ArrayPairDataset(
                ph.images[d.phantom_phases[0]], ph.images[d.phantom_phases[1]], keys, d.image_size
            )
        )
    return out[0], out[1]


def build_datasets(cfg) -> tuple[Dataset, Dataset]:
    """(train, val) for the config: phantom, or folder with the optional lesion-stratified split."""
    d = cfg.data
    if d.source == "phantom":
        return phantom_datasets(cfg)
    if not d.root:
        raise UserError(
            "data.root is empty; pass data.root=/path/to/slices (root/<phase>/<patient>_<slice>.nii.gz)"
        )
    ids = split_ids(cfg)
    return (
        SlicePairDataset(d.root, d.phase_a, d.phase_b, d.image_size, ids["train"], d.sort_pairs),
        SlicePairDataset(d.root, d.phase_a, d.phase_b, d.image_size, ids["val"], d.sort_pairs),
    )


def folder_patients(cfg) -> list[str]:
    """Sorted unique patient IDs that have at least one slice pair under ``data.root``."""
    d = cfg.data
    return sorted({patient_of(k) for k, _, _ in find_pairs(d.root, d.phase_a, d.phase_b, d.sort_pairs)})


def split_ids(cfg) -> dict[str, list[str]]:
    """Patient IDs per split: train/val, plus test when ``data.test_ratio > 0``.

    With ``data.split_file`` the official lesion-stratified split (per class in file order). Without it,
    the patients found under ``data.root`` form one class and go through the same procedure: sorted,
    shuffled by ``random.Random(data.split_seed)``, the first max(1, ⌊val_ratio·n⌋) are val (then the
    next max(1, ⌊test_ratio·n⌋) test), the rest train. No patient is in two splits.
    """
    d = cfg.data
    if d.split_file:
        classes = parse_lesion_list(d.split_file)
    else:
        patients = folder_patients(cfg)
        need = 3 if d.test_ratio > 0 else 2
        if len(patients) < need:
            raise UserError(
                f"{d.root}: {len(patients)} patient(s) found; a patient-level split needs at least {need} "
                "(add patients, or give data.split_file)"
            )
        classes = [patients]
    if d.test_ratio > 0:
        train, val, test = three_way_split(classes, d.val_ratio, d.test_ratio, d.split_seed)
        ids = {"train": train, "val": val, "test": test}
    else:
        train, val, _ = stratified_split(classes, d.val_ratio, d.split_seed)
        ids = {"train": train, "val": val}
    if not d.split_file:
        log.info(
            "data.split_file not set: patients split at random (seed data.split_seed=%d, data.val_ratio=%g%s): "
            "%s patients",
            d.split_seed,
            d.val_ratio,
            f", data.test_ratio={d.test_ratio:g}" if d.test_ratio > 0 else "",
            " / ".join(f"{len(v)} {k}" for k, v in ids.items()),
        )
    return ids


def build_split_dataset(cfg, split: str) -> Dataset:
    """One split ("train", "val" or "test") of the configured data."""
    d = cfg.data
    if split in ("train", "val"):
        return build_datasets(cfg)[0 if split == "train" else 1]
    if d.source != "folder" or d.test_ratio <= 0:
        raise UserError("split 'test' needs folder data and data.test_ratio > 0")
    return SlicePairDataset(d.root, d.phase_a, d.phase_b, d.image_size, split_ids(cfg)["test"], d.sort_pairs)


# ------------------------------------------------------------------------------ LLD-MMRI extractor
PHASE_ALIASES = {
    "c-pre": "pre",
    "c+pre": "pre",
    "pre": "pre",
    "c+a": "c_a",
    "arterial": "c_a",
    "c+v": "c_v",
    "venous": "c_v",
    "c+delay": "delay",
    "delay": "delay",
    "t2wi": "t2",
    "dwi": "dwi",
    "in phase": "in_phase",
    "out phase": "out_phase",
}


def normalise_phase(name: str) -> str:
    return PHASE_ALIASES.get(str(name).strip().lower(), re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()))


def parse_annotation(path: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``labels/Annotation.json`` → {patient: {phase: seriesUID}}.

    The file is walked recursively: every object with a ``phase`` and a series identifier
    (``seriesUID``/``series_uid``/``series``) found below a patient key (``MR…``) is one series.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: Annotation.json not found; expected <raw>/labels/Annotation.json")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc
    out: dict[str, dict[str, str]] = {}

    def series_id(obj: Mapping[str, Any]) -> str | None:
        for k in ("seriesUID", "series_uid", "SeriesUID", "series"):
            if k in obj:
                return str(obj[k])
        return None

    def walk(obj: Any, patient: str | None) -> None:
        if isinstance(obj, Mapping):
            sid = series_id(obj)
            if "phase" in obj and sid is not None and patient is not None:
                out.setdefault(patient, {})[normalise_phase(obj["phase"])] = sid
            for k, v in obj.items():
                walk(v, str(k) if re.match(r"^MR-?\d+", str(k)) else patient)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, patient)

    walk(data, None)
    if not out:
        raise UserError(f"{path}: no series with a 'phase' and 'seriesUID' found under a patient key (MR…)")
    return out


def _find_series(images: Path, patient: str, series: str) -> Path | None:
    for cand in sorted((images / patient).glob(f"*/{series}.nii*")):
        return cand
    return None


def register_rigid(
    moving, fixed, iterations: int = 50, seed: int = 42, levels: Sequence[int] = (4, 2, 1)
) -> tuple[Any, dict[str, Any]]:
    """Rigid registration of one 3D ``MedicalImage`` onto another; returns (moving on fixed's grid, info).

    SimpleITK Euler 3D transform about the fixed volume's centre, started from the identity (the scanner
    coordinates are the prior), Mattes mutual information (32 bins, at most ~50k random samples per level,
    fixed ``seed`` > 0; SimpleITK reads 0 as "seed from the clock"), regular-step gradient descent
    (first step 2 × the largest voxel spacing, relaxation 0.8) with physical-shift scales, and
    multi-resolution over the shrink ``levels`` that leave at least 8 voxels along every axis
    (smoothing σ = shrink/2 voxels).
    If the optimised transform does not lower the metric below the identity's, or the optimiser fails
    (e.g. it leaves no overlap), the identity is kept (``applied`` false; ``stop`` says why).
    ``info``: rotation (degrees about x, y, z), translation (mm, LPS), metric values, ``applied``, ``stop``.
    """
    import SimpleITK as sitk

    from medsynth_core.io import MedicalImage
    from medsynth_core.io.image import to_sitk

    f_img = sitk.Cast(to_sitk(fixed), sitk.sitkFloat32)
    m_img = sitk.Cast(to_sitk(moving), sitk.sitkFloat32)
    small = min(min(f_img.GetSize()), min(m_img.GetSize()))
    shrink = [int(k) for k in levels if k == 1 or small // int(k) >= 8] or [1]
    if shrink[-1] != 1:
        shrink.append(1)
    nvox = float(np.prod(f_img.GetSize()))
    identity = sitk.Euler3DTransform()
    identity.SetCenter(
        f_img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in f_img.GetSize()])
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([min(1.0, 50_000.0 * k**3 / nvox) for k in shrink], seed)
    reg.SetInterpolator(sitk.sitkLinear)
    step = 2.0 * max(f_img.GetSpacing())
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=step, minStep=1e-4 * step, numberOfIterations=int(iterations), relaxationFactor=0.8
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel([k / 2.0 if k > 1 else 0.0 for k in shrink])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(identity, inPlace=False)
    before = after = float("nan")
    try:
        before = float(reg.MetricEvaluate(f_img, m_img))
        final = reg.Execute(f_img, m_img)
        stop = reg.GetOptimizerStopConditionDescription()
        reg.SetInitialTransform(final, inPlace=False)
        after = float(reg.MetricEvaluate(f_img, m_img))  # same sampling as ``before``
        applied = after < before
    except RuntimeError as exc:  # e.g. no overlap left: keep the scanner-coordinate alignment
        stop = "failed: " + str(exc).strip().splitlines()[-1][:200]
        applied = False
    tx = final if applied else identity
    params = list(tx.GetParameters()) if applied else [0.0] * 6
    out = sitk.Resample(m_img, f_img, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    arr = np.ascontiguousarray(np.transpose(sitk.GetArrayFromImage(out)))
    info = {
        "applied": bool(applied),
        "rotation_deg": [round(float(np.degrees(a)), 3) for a in params[:3]],
        "translation_mm": [round(float(t), 3) for t in params[3:6]],
        "metric_identity": before,
        "metric_final": after,
        "shrink_factors": shrink,
        "stop": stop,
    }
    return MedicalImage(arr, fixed.affine.copy(), 3), info


def prepare_lld_mmri(
    raw: str | os.PathLike,
    out: str | os.PathLike,
    phases: Sequence[str] = ("c_v", "delay"),
    target: str | None = None,
    min_fraction: float = 0.0,
    patients: Sequence[str] | None = None,
    register: bool = True,
    register_iterations: int = 50,
) -> dict[str, Any]:
    """Extract co-registered axial 2D slice pairs from raw LLD-MMRI volumes.

    Our documented procedure (the official extractor is not released, spec §4): for each patient with
    every requested phase, register each phase rigidly onto the ``target`` phase (default: the last of
    ``phases``; :func:`register_rigid`: SimpleITK Euler 3D, Mattes mutual information, three resolution
    levels, ``register_iterations`` per level, started from the scanner-coordinate alignment) and resample
    it onto the target's grid with linear interpolation. ``register=False`` only resamples in scanner
    coordinates (core ``resample_to_reference``). Then cut axial slices along the volume's last array
    axis and keep the indices where every phase has data (non-zero fraction of the slice >
    ``min_fraction`` after resampling). Writes ``out/<phase>/<patient>_<k>.nii.gz`` (2D, with the slice's
    in-plane geometry). The report lists, per patient and phase, the rigid transform that was applied.
    """
    from medsynth_core.io import MedicalImage, resample_to_reference, write_image

    raw, out = Path(raw), Path(out)
    images = raw / "images"
    if not images.is_dir():
        raise UserError(
            f"{images}: folder missing; expected the LLD-MMRI layout images/<patient>/<study>/<series>.nii.gz"
        )
    series = parse_annotation(raw / "labels" / "Annotation.json")
    phases = [normalise_phase(p) for p in phases]
    target = normalise_phase(target) if target else phases[-1]
    if target not in phases:
        raise UserError(f"target phase {target!r} must be one of {phases}")
    if register_iterations < 1:
        raise UserError(f"--register-iterations must be >= 1, got {register_iterations}")
    report: dict[str, Any] = {
        "patients": 0,
        "slices": 0,
        "skipped": {},
        "registration": (
            f"rigid (Euler 3D, Mattes MI, up to 3 levels x {register_iterations} iterations) onto {target}"
            if register
            else f"none (resampled onto {target} in scanner coordinates)"
        ),
        "transforms": {},
    }
    log.info("prepare: %s", report["registration"])
    for patient in sorted(series):
        if patients is not None and patient not in patients:
            continue
        have = series[patient]
        missing = [p for p in phases if p not in have]
        if missing:
            report["skipped"][patient] = f"no series for phase(s) {missing}"
            continue
        paths = {p: _find_series(images, patient, have[p]) for p in phases}
        if any(v is None for v in paths.values()):
            report["skipped"][patient] = (
                f"series file missing for {[p for p, v in paths.items() if v is None]}"
            )
            continue
        try:
            vols = {p: read_image(paths[p], expect_ndim=3) for p in phases}
        except MedicalIOError as exc:
            report["skipped"][patient] = str(exc)
            continue
        ref = vols[target]
        grid = {target: ref}
        for p in phases:
            if p == target:
                continue
            if register:
                grid[p], info = register_rigid(vols[p], ref, register_iterations)
                report["transforms"].setdefault(patient, {})[p] = info
                log.log(
                    logging.INFO if info["applied"] else logging.WARNING,
                    "prepare: %s %s -> %s: %s, rotation %s deg, translation %s mm, MI %.4f -> %.4f (%s)",
                    patient,
                    p,
                    target,
                    "registered" if info["applied"] else "registration not applied, scanner alignment kept",
                    info["rotation_deg"],
                    info["translation_mm"],
                    info["metric_identity"],
                    info["metric_final"],
                    info["stop"],
                )
            else:
                grid[p] = resample_to_reference(vols[p], ref, "linear", 0.0)
        valid = np.ones(ref.spatial_shape[2], bool)
        for p in phases:
            frac = (grid[p].array != 0).reshape(-1, ref.spatial_shape[2]).mean(0)
            valid &= frac > min_fraction
        written = 0
        for k in np.flatnonzero(valid):
            affine = ref.affine.copy()
            affine[:3, 3] = ref.affine[:3, :3] @ np.array([0.0, 0.0, float(k)]) + ref.affine[:3, 3]
            for p in phases:
                sl = MedicalImage(np.ascontiguousarray(grid[p].array[:, :, k]), affine, 2)
                write_image(sl, out / p / f"{patient}_{int(k)}.nii.gz")
            written += 1
        report["patients"] += 1
        report["slices"] += written
    if report["patients"] == 0:
        raise UserError(f"{raw}: no patient has all phases {phases}; skipped: {report['skipped']}")
    return report

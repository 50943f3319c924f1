"""``uni-coal prepare``: raw NIfTI folders -> one ``<subject>.h5`` per subject in the official layout (spec §5),
plus ``train.txt`` / ``test.txt`` split lists beside them.

Every intensity volume is reoriented to LPS (slices along array axis 0), brought onto the grid of the
subject's reference volume, and mapped to uint8 as the official ``prepare_h5.py`` (foreground 0.5-99.5th
percentiles -> 0..255, clipped to [1, 255], background 0). Layouts (h5 keys):

- ``ixi``: ``T1``, ``T2``, ``PD``; T2/PD are registered to T1 (rigid, Mattes mutual information, SimpleITK)
  and resampled linearly onto the T1 grid. Files ``<subject>-<MOD>.nii.gz`` anywhere under the input (the
  official ``<subject>/<subject>-T1.nii.gz`` layout, or the IXI download folders ``IXI-T1/``, ``IXI-T2/``...).
- ``brats19``: ``t1``, ``t2``, ``flair``, ``seg`` from ``<subject>/<subject>_<mod>.nii.gz`` (BraTS volumes are
  already co-registered: same grid required, no registration); ``seg`` keeps its labels (uint8, not rescaled).
- ``adni``: ``t1`` (reference) and ``flair`` from ``<subject>-T1.nii.gz`` / ``<subject>-FLAIR.nii.gz``; the thick
  FLAIR is registered to T1 and resampled onto the T1 grid by nearest neighbour (the LR-on-HR-grid layout
  the official README asks for). The SR pair ``t1_hr4sr`` (= ``t1``) and ``t1_lr4sr`` (every t-th T1 slice,
  first slice aligned, repeated t times: nearest neighbour on the HR grid) is written with ``sr_thickness``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth_core.cli import UserError

from .data import read_lps_array, rescale_uint8


@dataclass(frozen=True)
class Layout:
    modalities: tuple[str, ...]  # file-name suffixes, in order; the first is the reference grid
    keys: tuple[str, ...]  # h5 dataset names
    pattern: str  # file name for (subject, suffix)
    labels: tuple[str, ...] = ()  # keys that are label maps (nearest neighbour, not rescaled)
    registration: str = "rigid"  # default for the non-reference volumes
    interpolator: str = "linear"
    optional: tuple[str, ...] = ()  # modalities a subject may lack without --skip-incomplete


LAYOUTS: dict[str, Layout] = {
    "ixi": Layout(("T1", "T2", "PD"), ("T1", "T2", "PD"), "{s}-{m}.nii.gz"),
    "brats19": Layout(
        ("t1", "t2", "flair", "seg"),
        ("t1", "t2", "flair", "seg"),
        "{s}_{m}.nii.gz",
        labels=("seg",),
        registration="none",
    ),
    "adni": Layout(("T1", "FLAIR"), ("t1", "flair"), "{s}-{m}.nii.gz", interpolator="nearest"),
}


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_image(path: Path):
    """A 3D volume as an LPS-oriented SimpleITK image (the training loader's reader: complete, finite, 3D)."""
    return read_lps_array(path)[1]


def register(fixed, moving, method: str, interpolator: str, seed: int = 0):
    """``moving`` on the grid of ``fixed``: ``none`` (grids must already agree), ``resample`` (identity in
    physical space) or ``rigid`` (Euler 3D, Mattes MI, 3-level pyramid, then resample)."""
    sitk = _sitk()
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    if method == "none":
        return moving
    tx = sitk.Transform(3, sitk.sitkIdentity)
    if method == "rigid":
        f = sitk.Cast(fixed, sitk.sitkFloat32)
        m = sitk.Cast(moving, sitk.sitkFloat32)
        init = sitk.CenteredTransformInitializer(
            f, m, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
        )
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.25, seed)
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=1.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6
        )
        reg.SetOptimizerScalesFromPhysicalShift()
        levels = [s for s in (4, 2, 1) if min(fixed.GetSize()) // s >= 16] or [1]
        reg.SetShrinkFactorsPerLevel(levels)
        reg.SetSmoothingSigmasPerLevel([s / 2 for s in levels])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetInitialTransform(init, inPlace=False)
        tx = reg.Execute(f, m)
    return sitk.Resample(moving, fixed, tx, interp, 0.0, sitk.sitkFloat32)


def decimate_on_grid(volume: np.ndarray, t: int) -> np.ndarray:
    """Thick-slice volume on the HR grid: slice k*t (first slice aligned) repeated for k*t..k*t+t-1."""
    idx = (np.arange(volume.shape[0]) // t) * t
    return volume[idx]


def find_subjects(root: Path, layout: Layout) -> dict[str, dict[str, Path]]:
    """subject -> {modality: file} for every ``pattern`` match under ``root`` (any depth)."""
    found: dict[str, dict[str, Path]] = {}
    for mod in layout.modalities:
        suffix = layout.pattern.format(s="", m=mod)
        for f in root.rglob("*" + suffix):
            if f.name.startswith(".") or not f.is_file():
                continue
            subj = f.name[: -len(suffix)]
            if subj:
                found.setdefault(subj, {})[mod] = f
    return found


def split_subjects(names: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_test = int(round(test_fraction * len(names)))
    if test_fraction > 0 and len(names) > 1:
        n_test = min(max(n_test, 1), len(names) - 1)
    test = sorted(names[i] for i in order[:n_test])
    train = [n for n in names if n not in set(test)]
    return train, test


def prepare(
    input_dir: str | Path,
    output_dir: str | Path,
    layout: str = "ixi",
    modalities: Sequence[str] | None = None,
    registration: str | None = None,
    sr_thickness: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    skip_incomplete: bool = False,
) -> dict:
    """Write ``output_dir/<subject>.h5`` and ``train.txt`` / ``test.txt``; returns a summary."""
    from medsynth_core.io import write_h5

    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    lay = LAYOUTS[layout]
    if modalities:
        unknown = [m for m in modalities if m not in lay.modalities]
        if unknown:
            raise UserError(f"--modalities {unknown}: layout {layout} has {list(lay.modalities)}")
        if lay.modalities[0] not in modalities:
            raise UserError(
                f"--modalities must include the reference {lay.modalities[0]} (the grid of the others)"
            )
        mods = tuple(m for m in lay.modalities if m in modalities)
    else:
        mods = lay.modalities
    method = registration or lay.registration
    if method not in ("rigid", "resample", "none"):
        raise UserError(f"--registration {method!r}: choose rigid, resample or none")
    if sr_thickness is not None and sr_thickness < 2:
        raise UserError(f"--sr-thickness {sr_thickness}: must be >= 2")
    if not 0 <= test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction}: must be in [0, 1)")
    root, out = Path(input_dir), Path(output_dir)
    if not root.is_dir():
        raise UserError(f"{root}: input folder not found")
    found = find_subjects(root, lay)
    if not found:
        example = lay.pattern.format(s="<subject>", m=mods[0])
        raise UserError(f"{root}: no subject files found (expected e.g. <subject>/{example})")
    skipped: dict[str, str] = {}
    written: list[str] = []
    for subj in sorted(found):
        files = found[subj]
        missing = [m for m in mods if m not in files]
        if missing:
            folder = files[next(iter(files))].parent
            expect = folder / lay.pattern.format(s=subj, m=missing[0])
            if not skip_incomplete:
                raise UserError(
                    f"{expect}: file not found (subject {subj} lacks {missing}; --skip-incomplete skips it)"
                )
            skipped[subj] = f"missing {missing}"
            continue
        ref = read_image(files[mods[0]])
        arrays: dict[str, np.ndarray] = {}
        for mod in mods:
            key = lay.keys[lay.modalities.index(mod)]
            img = ref if mod == mods[0] else read_image(files[mod])
            is_label = key in lay.labels
            if mod != mods[0]:
                same = img.GetSize() == ref.GetSize()
                if method == "none" and not same:
                    raise UserError(
                        f"{files[mod]}: size {img.GetSize()} differs from {files[mods[0]].name} {ref.GetSize()}; "
                        "co-register first or use --registration rigid/resample"
                    )
                if method != "none":
                    img = register(
                        ref,
                        img,
                        "resample" if is_label else method,
                        "nearest" if is_label else lay.interpolator,
                        seed,
                    )
            arr = _sitk().GetArrayFromImage(img)
            if not np.isfinite(arr).all():
                raise UserError(f"{files[mod]}: contains NaN/Inf values; clean the volume first")
            if is_label:
                if arr.min() < 0 or arr.max() > 255 or not np.allclose(arr, np.round(arr)):
                    raise UserError(f"{files[mod]}: label map must hold integers 0..255")
                arrays[key] = np.round(arr).astype(np.uint8)
                continue
            try:
                arrays[key] = rescale_uint8(arr)
            except ValueError as exc:
                raise UserError(f"{files[mod]}: {exc}") from exc
        if sr_thickness is not None:
            hr = arrays[lay.keys[0]]
            arrays[f"{lay.keys[0]}_hr4sr"] = hr
            arrays[f"{lay.keys[0]}_lr4sr"] = decimate_on_grid(hr, sr_thickness)
        write_h5(out / f"{subj}.h5", arrays, attrs={"subject": subj, "layout": layout})
        written.append(subj)
    if not written:
        raise UserError(f"{root}: every subject was skipped ({skipped})")
    train, test = split_subjects(written, test_fraction, seed)
    (out / "train.txt").write_text("".join(f"{n}.h5\n" for n in train))
    (out / "test.txt").write_text("".join(f"{n}.h5\n" for n in test))
    keys = [lay.keys[lay.modalities.index(m)] for m in mods]
    if sr_thickness is not None:
        keys += [f"{lay.keys[0]}_hr4sr", f"{lay.keys[0]}_lr4sr"]
    return {
        "output": str(out),
        "subjects": len(written),
        "keys": keys,
        "train": len(train),
        "test": len(test),
        "skipped": skipped,
        "registration": method,
    }

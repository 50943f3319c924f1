"""The held-out evaluation every package shows (``../shared/LEARNING.md``): baselines, writer, re-scoring.

A package's ``demo`` trains its recipe, then, for every held-out case, hands this module the target, its
prediction, the inputs and the baselines (computed with the functions below, on the same case). The
:class:`HeldoutTask` writes ``heldout[/<task>]/<case>/<role>.nii.gz`` (roles ``input_<name>``, ``target``,
``pred``, ``baseline_<name>``), scores every prediction with the same metric code and returns the
``heldout`` block of ``metrics.json``; :func:`rescore` recomputes that block from the NIfTI files alone, so
anyone can check the JSON; :func:`save_heldout_figure` draws one row per case
(inputs | baselines | ours | target | \\|ours - target\\|) with the metric in every panel title.

Conventions:

* Arrays are numpy or torch, 2D ``(H, W)`` or 3D ``(D, H, W)`` (a leading singleton channel/batch axis is
  dropped). Intensities must already be on the metric's scale, [0, 1]; every prediction (ours and the
  baselines alike) is clipped to [0, 1] before it is written and scored, so the files are what was scored.
* PSNR in dB with ``data_range=1`` over the whole image (slice for 2D, volume for 3D), averaged over cases
  (:func:`medsynth_core.metrics.psnr`); SSIM with the Gaussian 11-tap window (7 when an axis is shorter),
  also over the whole image.
* 2D cases are written as one-slice volumes.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core.atomic import atomic_output

__all__ = [
    "HeldoutTask",
    "avgpool_upsample",
    "check_margins",
    "copy_source",
    "interpolate",
    "oracle_linear",
    "rescore",
    "save_heldout_figure",
    "score",
    "write_metrics",
]

METRIC = "psnr_db"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------------------
# baselines (standard versions, LEARNING.md "Honest margins")


def _tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _like(out: torch.Tensor, ref: Any) -> Any:
    if isinstance(ref, torch.Tensor):
        return out.to(ref.dtype if ref.is_floating_point() else torch.float32)
    return out.numpy().astype(np.asarray(ref).dtype if np.asarray(ref).dtype.kind == "f" else np.float32)


def copy_source(source: Any) -> Any:
    """The source image unchanged (the trivial answer for same-geometry translation)."""
    return source.clone() if isinstance(source, torch.Tensor) else np.array(source, copy=True)


def interpolate(image: Any, size: Sequence[int], mode: str = "linear") -> Any:
    """Resize a 2D ``(H, W)`` or 3D ``(D, H, W)`` image as ``torch.nn.functional.interpolate`` does.

    ``mode`` is ``nearest``, ``linear`` (bilinear in 2D, trilinear in 3D; ``bilinear``/``trilinear`` are
    accepted too) or ``bicubic``; ``align_corners=False`` (torch's default), so a thick-slice stack whose
    voxel centres sit in the middle of their slabs is upsampled to the right positions.
    """
    x = _tensor(image)
    nd = x.ndim
    if nd not in (2, 3) or len(size) != nd:
        raise ValueError(f"interpolate: expected a 2D or 3D image and a size of the same length, got "
                         f"shape {tuple(x.shape)} and size {tuple(size)}")
    if mode in ("linear", "bilinear", "trilinear"):
        torch_mode = "bilinear" if nd == 2 else "trilinear"
    elif mode in ("nearest", "bicubic"):
        torch_mode = mode
    else:
        raise ValueError(f"interpolate: mode must be nearest, linear or bicubic, got {mode!r}")
    kw = {} if torch_mode == "nearest" else {"align_corners": False}
    out = F.interpolate(x[None, None], size=tuple(int(s) for s in size), mode=torch_mode, **kw)[0, 0]
    return _like(out, image)


def avgpool_upsample(image: Any, factor: int | Sequence[int], mode: str = "linear") -> Any:
    """Average-pool by ``factor`` (per axis), then interpolate back to the input size (``mode`` as above).

    The baseline of an autoencoder compressing by ``factor``: the information a latent of that size keeps
    with no learning at all. The input size must be divisible by the factor.
    """
    x = _tensor(image)
    nd = x.ndim
    f = (int(factor),) * nd if isinstance(factor, int) else tuple(int(v) for v in factor)
    if len(f) != nd or any(s % k for s, k in zip(x.shape, f)):
        raise ValueError(f"avgpool_upsample: shape {tuple(x.shape)} is not divisible by factor {f}")
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    small = pool(x[None, None], kernel_size=f, stride=f)[0, 0]
    return interpolate(_like(small, image) if isinstance(image, torch.Tensor) else small.numpy(),
                       tuple(x.shape), mode)


def oracle_linear(source: Any, target: Any, mask: Any = None) -> Any:
    """``a * source + b`` with ``(a, b)`` the least-squares fit to ``target`` over the case (an oracle).

    It uses the target, so its name in a report is ``oracle_linear``: the best any single global intensity
    map of the source can do. ``mask`` restricts the fit (not the output) to some voxels.
    """
    s, t = _tensor(source), _tensor(target)
    if s.shape != t.shape:
        raise ValueError(f"oracle_linear: source {tuple(s.shape)} and target {tuple(t.shape)} differ in shape")
    sel = torch.ones_like(s, dtype=torch.bool) if mask is None else _tensor(mask).bool()
    x, y = s[sel], t[sel]
    xm, ym = x.mean(), y.mean()
    var = ((x - xm) ** 2).mean()
    a = ((x - xm) * (y - ym)).mean() / var if var > 0 else torch.zeros((), dtype=torch.float64)
    b = ym - a * xm
    return _like(a * s + b, source)


# ----------------------------------------------------------------------------------------------
# scoring


def _as_image(x: Any, what: str) -> np.ndarray:
    arr = x.detach().to("cpu", torch.float32).numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = np.asarray(arr, dtype=np.float32)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]  # (1, H, W): one channel or one slice -> 2D
    if arr.ndim not in (2, 3):
        raise ValueError(f"held-out {what}: expected a 2D (H, W) or 3D (D, H, W) image, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"held-out {what}: contains NaN/Inf; the model or baseline diverged")
    return arr


def _ssim_window(shape: Sequence[int]) -> int:
    smallest = min(shape)
    if smallest >= 11:
        return 11
    w = smallest if smallest % 2 else smallest - 1
    return max(w, 3)


def score(pred: Any, target: Any) -> dict[str, float]:
    """PSNR (dB, data_range 1) and SSIM of one case; both arrays [0, 1], same 2D/3D shape."""
    from medsynth_core.metrics import psnr, ssim

    p, t = _as_image(pred, "prediction"), _as_image(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"held-out: prediction {p.shape} and target {t.shape} differ in shape")
    pt, tt = torch.from_numpy(p)[None, None].double(), torch.from_numpy(t)[None, None].double()
    out = {"psnr_db": float(psnr(pt, tt, data_range=1.0)[0])}
    if min(p.shape) >= 3:
        out["ssim"] = float(ssim(pt, tt, data_range=1.0, win_size=_ssim_window(p.shape))[0])
    return out


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


def _summary(per_case: Mapping[str, Mapping[str, Any]], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``heldout`` block: case means of every metric for ours and for every baseline."""
    cases = list(per_case)
    first = per_case[cases[0]] if cases else {}
    names = list(first.get("baselines", {}))
    block: dict[str, Any] = {
        "cases": len(cases),
        "metric": METRIC,
        "method": _mean([per_case[c]["method"][METRIC] for c in cases]),
        "baselines": {n: _mean([per_case[c]["baselines"][n][METRIC] for c in cases]) for n in names},
    }
    if all("ssim" in per_case[c]["method"] for c in cases) and cases:
        block["ssim"] = {
            "method": _mean([per_case[c]["method"]["ssim"] for c in cases]),
            "baselines": {n: _mean([per_case[c]["baselines"][n]["ssim"] for c in cases]) for n in names},
        }
    if names:
        best = max(names, key=lambda n: block["baselines"][n])
        block["best_baseline"] = best
        block["margin_db"] = block["method"] - block["baselines"][best]
    block["per_case"] = {c: dict(per_case[c]) for c in cases}
    if extra:
        block.update(extra)
    return block


# ----------------------------------------------------------------------------------------------
# the writer


def _check_name(name: str, what: str) -> str:
    if not _NAME.match(str(name)):
        raise ValueError(f"held-out {what} name {name!r}: use letters, digits, '_', '-', '.' only")
    return str(name)


def _to_disk(arr: np.ndarray) -> np.ndarray:
    """``(D, H, W)`` or ``(H, W)`` (torch order) -> NIfTI disk order ``(W, H, D)``; 2D as one slice."""
    if arr.ndim == 2:
        arr = arr[None]
    return np.ascontiguousarray(np.transpose(arr))


def _from_disk(arr: np.ndarray) -> np.ndarray:
    out = np.transpose(np.asarray(arr, dtype=np.float32))
    return out[0] if out.shape[0] == 1 else out


class HeldoutTask:
    """Collects held-out cases of one task, writes their NIfTI files and scores them.

    ``root`` is the ``heldout`` folder of the demo output; ``task`` (e.g. ``"sr"``, ``"a_to_b"``) adds one
    folder level and becomes the key of the block in ``metrics.json`` (``None``: a single-task package).
    """

    def __init__(self, root: str | os.PathLike, task: str | None = None, write: bool = True):
        self.task = None if task is None else _check_name(task, "task")
        self.dir = Path(root) if task is None else Path(root) / self.task
        self.write = write
        self.per_case: dict[str, dict[str, Any]] = {}
        self.images: dict[str, dict[str, np.ndarray]] = {}  # case -> role -> array (for the figure)
        self.extra: dict[str, Any] = {}

    def add_case(
        self,
        case: str,
        target: Any,
        pred: Any,
        baselines: Mapping[str, Any],
        inputs: Mapping[str, Any] | None = None,
        affine: np.ndarray | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """Add one case; returns its scores. ``metrics`` adds the package's own per-case figures."""
        case = _check_name(case, "case")
        if case in self.per_case:
            raise ValueError(f"held-out case {case!r} added twice")
        if not baselines:
            raise ValueError("held-out: every case needs at least one named baseline")
        tgt = np.clip(_as_image(target, "target"), 0.0, 1.0)
        roles: dict[str, np.ndarray] = {}
        for name, x in (inputs or {}).items():
            roles[f"input_{_check_name(name, 'input')}"] = _as_image(x, f"input {name}")
        for name, x in baselines.items():
            roles[f"baseline_{_check_name(name, 'baseline')}"] = np.clip(_as_image(x, f"baseline {name}"), 0, 1)
        roles["pred"] = np.clip(_as_image(pred, "prediction"), 0.0, 1.0)
        roles["target"] = tgt
        entry: dict[str, Any] = {
            "method": score(roles["pred"], tgt),
            "baselines": {n: score(roles[f"baseline_{n}"], tgt) for n in baselines},
        }
        if metrics:
            entry["metrics"] = {k: float(v) for k, v in metrics.items()}
        if self.write:
            aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
            from medsynth_core.io import write_image

            for role, arr in roles.items():
                write_image(_to_disk(arr.astype(np.float32)), self.dir / case / f"{role}.nii.gz", affine=aff)
        self.per_case[case] = entry
        self.images[case] = roles
        return entry

    def summary(self) -> dict[str, Any]:
        """The ``heldout`` block (or ``heldout.<task>``) of ``metrics.json``; ``extra`` keys are merged in."""
        if not self.per_case:
            raise ValueError(f"held-out task {self.task or '(default)'}: no cases were added")
        return _summary(self.per_case, self.extra)

    def figure_rows(
        self,
        max_cases: int | None = None,
        panel: Callable[[np.ndarray], np.ndarray] | None = None,
        baseline_errors: bool = False,
    ) -> tuple[list[list[np.ndarray]], list[list[str]], list[str]]:
        """Panels ``inputs | baselines | ours | target | |ours-target|``, their titles and the case names.

        ``panel`` maps a 3D volume to the 2D image shown (default: the middle slice along the first axis).
        ``baseline_errors`` appends ``|baseline-target|`` for every baseline after ours' error map, so the
        error maps can be compared side by side.
        """
        panel = panel or _middle_slice
        rows, titles = [], []
        cases = list(self.images)[:max_cases]
        for case in cases:
            roles, sc = self.images[case], self.per_case[case]

            def show(arr: np.ndarray) -> np.ndarray:
                return arr if arr.ndim == 2 else panel(arr)

            row, tit = [], []
            for role, arr in roles.items():
                if role.startswith("input_"):
                    row.append(show(arr))
                    tit.append(role[len("input_"):])
            for name in sc["baselines"]:
                row.append(show(roles[f"baseline_{name}"]))
                tit.append(f"{name} {sc['baselines'][name][METRIC]:.1f}dB")
            row += [show(roles["pred"]), show(roles["target"]), np.abs(show(roles["pred"]) - show(roles["target"]))]
            tit += [f"ours {sc['method'][METRIC]:.1f}dB", "target", "|ours-target|"]
            if baseline_errors:
                for name in sc["baselines"]:
                    row.append(np.abs(show(roles[f"baseline_{name}"]) - show(roles["target"])))
                    tit.append(f"|{name}-target|")
            rows.append(row)
            titles.append(tit)
        return rows, titles, cases


def _middle_slice(arr: np.ndarray) -> np.ndarray:
    return arr[arr.shape[0] // 2]


def save_heldout_figure(
    path: str | os.PathLike,
    tasks: HeldoutTask | Sequence[HeldoutTask],
    max_cases: int | None = 4,
    scale: int = 2,
    panel: Callable[[np.ndarray], np.ndarray] | None = None,
    baseline_errors: bool = False,
) -> Path:
    """One row per held-out case of each task: inputs | baselines | ours | target | |ours-target|
    (then ``|baseline-target|`` for each baseline with ``baseline_errors``).

    Intensity panels share the [0, 1] display range (the metric's scale); error panels are shown on
    [0, 0.5] so small errors stay visible. Row titles name the task and case. ``panel`` maps a 3D volume to
    the 2D image shown (default: its middle slice along the first axis).
    """
    from medsynth_core.viz import save_grid, to_uint8

    tasks = [tasks] if isinstance(tasks, HeldoutTask) else list(tasks)
    rows, titles, names = [], [], []
    for task in tasks:
        r, t, cases = task.figure_rows(max_cases, panel, baseline_errors)
        for case, row, tit in zip(cases, r, t):
            rows.append(
                [to_uint8(im, (0.0, 0.5) if ti.startswith("|") else (0.0, 1.0)) for im, ti in zip(row, tit)]
            )
            titles.append(tit)
            names.append(f"{task.task} {case}" if task.task else case)
    return save_grid(path, rows, titles=titles, scale=scale, row_titles=names)


# ----------------------------------------------------------------------------------------------
# files


def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf become None (json.dump would write invalid JSON)."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_metrics(
    path: str | os.PathLike,
    heldout: HeldoutTask | Sequence[HeldoutTask] | Mapping[str, Any],
    train: Mapping[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Write ``metrics.json`` atomically: the ``heldout`` block(s), ``train`` and the package's own keys.

    Several tasks give ``{"heldout": {task: block, ...}}``; one untitled task gives ``{"heldout": block}``.
    Returns what was written.
    """
    if isinstance(heldout, HeldoutTask):
        heldout = [heldout]
    if isinstance(heldout, Mapping):
        blocks = dict(heldout)
    elif len(heldout) == 1 and heldout[0].task is None:
        blocks = heldout[0].summary()
    else:
        if any(t.task is None for t in heldout):
            raise ValueError("write_metrics: with several held-out tasks every task needs a name")
        blocks = {t.task: t.summary() for t in heldout}
    doc: dict[str, Any] = {"heldout": blocks}
    if train is not None:
        doc["train"] = dict(train)
    doc.update(extra)
    doc = _finite(doc)
    path = Path(path)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def rescore(heldout_dir: str | os.PathLike) -> dict[str, Any]:
    """Recompute the ``heldout`` block(s) from the NIfTI files alone (``heldout/`` of a demo output).

    A folder whose sub-folders hold ``target.nii.gz`` is one task; otherwise each sub-folder is a task.
    The result has the shape :func:`write_metrics` writes (per-case package metrics are not recomputed).
    """
    import nibabel as nib

    root = Path(heldout_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no held-out folder; run the package's demo first")

    def task_block(folder: Path) -> dict[str, Any]:
        per_case = {}
        for case in sorted(p for p in folder.iterdir() if (p / "target.nii.gz").is_file()):
            def load(name: str, case=case) -> np.ndarray:
                return _from_disk(np.asarray(nib.load(str(case / name)).dataobj))
            target = load("target.nii.gz")
            baselines = sorted(p.name[len("baseline_"):-len(".nii.gz")] for p in case.glob("baseline_*.nii.gz"))
            per_case[case.name] = {
                "method": score(load("pred.nii.gz"), target),
                "baselines": {b: score(load(f"baseline_{b}.nii.gz"), target) for b in baselines},
            }
        if not per_case:
            raise FileNotFoundError(f"{folder}: no case folders with target.nii.gz")
        return _summary(per_case)

    if any((p / "target.nii.gz").is_file() for p in root.iterdir() if p.is_dir()):
        return task_block(root)
    return {p.name: task_block(p) for p in sorted(root.iterdir()) if p.is_dir()}


def check_margins(block: Mapping[str, Any], margins: Mapping[str, float], metric: str = METRIC) -> list[str]:
    """Which margins a ``heldout`` block misses: ``{baseline: dB}`` means ours ≥ baseline + dB.

    Returns one human line per miss (empty list: all met), naming ours, the baseline and the gap, so a
    failing ``test_learns.py`` says exactly by how much.
    """
    if metric != block.get("metric", METRIC):
        raise ValueError(f"check_margins: block reports {block.get('metric')!r}, not {metric!r}")
    misses = []
    for name, margin in margins.items():
        if name not in block["baselines"]:
            raise KeyError(f"check_margins: no baseline {name!r} (have {sorted(block['baselines'])})")
        ours, base = block["method"], block["baselines"][name]
        if not (ours >= base + margin):
            misses.append(f"ours {ours:.2f} dB < {name} {base:.2f} dB + {margin} dB (short by "
                          f"{base + margin - ours:.2f} dB)")
    return misses

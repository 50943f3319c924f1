"""Checkpoints that are written atomically and resume a run exactly.

A checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``)::

    {"format": "medsynth-checkpoint", "version": 1, "kind": <model family, e.g. a package name>,
     "step": int, "epoch": int, "models": {name: state_dict}, "optimizers": {...},
     "schedulers": {...}, "scaler": {...} | None, "emas": {...}, "rng": {...},
     "config": {...} | None, "extra": {...}}

RNG states (python, numpy, torch CPU, every CUDA device) are stored as tensors and lists so the
file stays ``weights_only``-safe; restoring them makes the continuation bit-identical on CPU.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_output
from .config import save_config
from .errors import CheckpointError  # noqa: F401  (re-exported here)

log = logging.getLogger(__name__)

FORMAT = "medsynth-checkpoint"
VERSION = 1


# --------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    # the legacy global numpy RNG is what user code and libraries draw from, so it is saved too
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            cuda = cuda[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------- save and load
def _states(objs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v.state_dict() for k, v in (objs or {}).items() if v is not None}


def _first_line(exc: BaseException) -> str:
    """torch.load's messages run over many lines (weights_only advice); errors are one line."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
    return lines[0] if lines else ""


def build_checkpoint(
    *,
    kind: str,
    step: int,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    scaler: Any | None = None,
    emas: Mapping[str, Any] | None = None,
    epoch: int = 0,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    include_rng: bool = True,
) -> dict[str, Any]:
    """Collect everything a run needs to continue. Models are unwrapped from DDP/compile first."""
    from .distributed import unwrap

    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "step": int(step),
        "epoch": int(epoch),
        "models": {k: unwrap(m).state_dict() for k, m in models.items()},
        "optimizers": _states(optimizers),
        "schedulers": _states(schedulers),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "emas": _states(emas),
        "rng": capture_rng_state() if include_rng else None,
        "config": dict(config) if config is not None else None,
        "extra": dict(extra or {}),
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint(
    path: str | os.PathLike, kind: str | None = None, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`build_checkpoint` (``weights_only=True``).

    ``kind`` guards against loading another model family's checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; check the path or the run directory")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle with code objects, ...
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}: {_first_line(exc)}); "
            "it may be truncated or not a medsynth checkpoint (official checkpoints: use convert-official)"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a medsynth checkpoint (no '{FORMAT}' marker); "
            "for a checkpoint of the official code run the package's `convert-official` verb first"
        )
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(
            f"{path}: this checkpoint belongs to '{ckpt.get('kind')}', not '{kind}'; pick a checkpoint of this model"
        )
    return ckpt


def _official_safe_globals() -> list[Any]:
    """Non-tensor objects that official checkpoints carry and that are safe to rebuild: argparse
    namespaces of the training arguments and numpy scalars/dtypes of logged metrics."""
    import argparse

    allowed: list[Any] = [argparse.Namespace, np.dtype, np.ndarray]
    core = getattr(np, "_core", None) or np.core
    allowed += [core.multiarray.scalar, core.multiarray._reconstruct]
    allowed += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return allowed


def load_official_file(path: str | os.PathLike, trust_pickle: bool = False) -> Any:
    """Read an official (foreign) checkpoint for ``convert-official`` without running pickled code.

    Loads with ``weights_only=True`` plus :func:`_official_safe_globals`; a file that needs anything else is
    refused with one line naming the objects and ``--trust-pickle``. ``trust_pickle=True`` loads it with full
    pickle (which can execute code) after a warning: only for files you trust."""
    import warnings

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: official checkpoint not found; check the path")
    if trust_pickle:
        warnings.warn(
            f"{path}: loading with full pickle (--trust-pickle): this can run code stored in the file",
            RuntimeWarning,
            stacklevel=2,
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: cannot be read by torch.load ({type(exc).__name__}: {_first_line(exc)})") from exc
    try:
        with torch.serialization.safe_globals(_official_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001
            names = []
        what = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "") if names else str(exc).splitlines()[0]
        raise CheckpointError(
            f"{path}: holds pickled objects beyond tensors ({what}); refusing to unpickle them. If you trust "
            "the file, pass --trust-pickle (full pickle can run code)"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read by torch.load ({type(exc).__name__}: {_first_line(exc)})") from exc


def _key_report(missing: list[str], unexpected: list[str], limit: int = 12) -> str:
    def fmt(keys: list[str]) -> str:
        more = f" … (+{len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
    return "; ".join(parts)


def load_module_state(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint", strict: bool = True
) -> None:
    """``load_state_dict`` with an error that lists missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if strict and (missing or unexpected):
        problems.append(_key_report(missing, unexpected))
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): " + "; ".join(shapes[:8]))
    if problems:
        raise CheckpointError(
            f"{source}: weights do not fit {type(module).__name__}: " + " | ".join(problems)
            + ". Was it trained with a different config? Use the config saved beside the checkpoint."
        )
    module.load_state_dict(state_dict, strict=strict)


def restore_checkpoint(
    ckpt: Mapping[str, Any],
    *,
    models: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    scaler: Any | None = None,
    emas: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
    source: str = "checkpoint",
) -> tuple[int, int]:
    """Put a checkpoint's states back into live objects; returns ``(step, epoch)``."""
    from .distributed import unwrap

    for group, objs in (("models", models), ("optimizers", optimizers), ("schedulers", schedulers),
                        ("emas", emas)):
        stored = ckpt.get(group) or {}
        for name, obj in (objs or {}).items():
            if name not in stored:
                raise CheckpointError(f"{source}: has no {group[:-1]} '{name}' (it holds: {sorted(stored)})")
            if group == "models":
                load_module_state(unwrap(obj), stored[name], source=f"{source} [{name}]")
            else:
                obj.load_state_dict(stored[name])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng") is not None:
        restore_rng_state(ckpt["rng"])
    return int(ckpt.get("step", 0)), int(ckpt.get("epoch", 0))


# ------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Numbered checkpoints in one folder: ``<prefix>_<step:08d>.pt``, keeping the last ``keep_last``.

    Extra named files (``best.pt``) are never pruned. ``config.yaml`` is written beside them.
    Only call ``save`` on the main process.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3, prefix: str = "step"):
        if keep_last < 1:
            raise ValueError("keep_last must be >= 1")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.prefix = prefix
        self._pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.pt$")

    def path_for(self, step: int) -> Path:
        return self.directory / f"{self.prefix}_{int(step):08d}.pt"

    def list(self) -> list[Path]:
        """Numbered checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self._pattern.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def resume_source(self, resume: str | os.PathLike | None = None) -> Path | None:
        """The checkpoint a run continues from: ``resume`` when given, else the latest one here (or None)."""
        return Path(resume) if resume else self.latest()

    def resume(
        self,
        resume: str | os.PathLike | None,
        kind: str,
        *,
        map_location: str | torch.device = "cpu",
        **state: Any,
    ) -> tuple[int, Path | None]:
        """Restore ``state`` (the keyword arguments of :func:`restore_checkpoint`) from
        :meth:`resume_source`; returns ``(step, path)``, or ``(0, None)`` for a fresh run."""
        src = self.resume_source(resume)
        if src is None:
            return 0, None
        step, _ = restore_checkpoint(load_checkpoint(src, kind=kind, map_location=map_location),
                                     source=str(src), **state)
        log.info("resumed from %s at step %d", src, step)
        return step, src

    def save(self, ckpt: Mapping[str, Any], name: str | None = None) -> Path:
        """Write ``ckpt`` atomically (numbered by its step, or as ``name``) and prune old ones."""
        path = self.directory / name if name else self.path_for(ckpt["step"])
        atomic_torch_save(dict(ckpt), path)
        if ckpt.get("config") is not None:
            save_config(ckpt["config"], self.directory / "config.yaml")
        if name is None:
            for old in self.list()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def saver(self, kind: str, *, main: bool = True, **state: Any) -> Callable[..., Path | None]:
        """``save(step, name=None)`` for a training loop: builds the checkpoint of ``state`` (the keyword
        arguments of :func:`build_checkpoint`: ``models``, ``optimizers``, ``emas``, ``scaler``, ``config``,
        ``extra``, ...) at that step and saves it; a no-op returning None where ``main`` is False (DDP ranks
        other than 0). One definition instead of a closure per loop (issue 17)."""

        def save(step: int, name: str | None = None) -> Path | None:
            if not main:
                return None
            return self.save(build_checkpoint(kind=kind, step=int(step), **state), name=name)

        return save


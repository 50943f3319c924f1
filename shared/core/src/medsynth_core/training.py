"""Pieces every trainer uses: EMA, autocast choice, gradient clipping, run directories, a rank-0
logger (console + TensorBoard + JSONL), tqdm on rank 0, and a step-indexed loader that resumes
mid-epoch exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import CHANNELS_LAST, channels_last_setting
from .distributed import get_rank, get_world_size, is_main_process, unwrap

log = logging.getLogger("medsynth")


# -------------------------------------------------------------------------------------------- EMA
class EMA:
    """Exponential moving average of a module's parameters (buffers are copied).

    ``update(model)`` does ``θ_ema ← decay·θ_ema + (1−decay)·θ``; pass ``decay=`` per call for
    schedules (warm-up, half-life, "plain copy before step N"). ``module`` is the averaged copy, in
    eval mode and without gradients.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module, decay: float | None = None) -> None:
        d = self.decay if decay is None else decay
        src = unwrap(model)
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach().to(q.dtype) for p, q in zip(src.parameters(), ema_p)]
        if ema_p:
            torch._foreach_lerp_(ema_p, cur_p, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), src.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from(self, model: torch.nn.Module) -> None:
        """Set the average to the model's current weights (a decay-0 update)."""
        self.update(model, decay=0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])


def ema_decay_from_half_life(batch_size: int, half_life_samples: float) -> float:
    """Decay per step such that the weight of a sample halves after ``half_life_samples`` samples."""
    return 0.5 ** (batch_size / max(half_life_samples, 1e-8))


# ------------------------------------------------------------------------------- precision, grads
def autocast_dtype(device: torch.device | str, enabled: bool = True) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, else fp16 on CUDA; ``None`` (fp32) on CPU or when off."""
    device = torch.device(device)
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device | str, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA; a no-op on CPU so CPU results never change."""
    dtype = autocast_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device | str, enabled: bool = True) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 autocast (bf16 and fp32 need none)."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, enabled) == torch.float16)


def channels_last_enabled(setting: str | bool, device: torch.device | str) -> bool:
    """``run.channels_last``: ``auto`` (on CUDA only, so CPU results never change), ``on`` or ``off``."""
    setting = channels_last_setting(setting)
    if setting not in CHANNELS_LAST:
        raise ValueError(f"channels_last must be one of {CHANNELS_LAST}, got {setting!r}")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


def to_channels_last(module: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Store the module's 4-D weights (and buffers) channels_last and its 5-D ones channels_last_3d, in place.

    Convolutions then run in the NHWC / NDHWC layout (oneDNN on CPU, cuDNN on GPU) and hand that layout on to
    the next layer, without any change to the inputs; values are the same up to the order of float sums
    (within the fixtures' tolerances, not bit-identical). Call it before the optimiser's state exists."""
    if not enabled:
        return module
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}
    with torch.no_grad():
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for t in table.values():
                    if t is not None and t.ndim in fmt:
                        t.data = t.data.contiguous(memory_format=fmt[t.ndim])
    return module


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip to ``max_norm`` (skip when None/≤0); returns the total norm before clipping."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        norms = torch.stack([p.grad.detach().norm() for p in params])
        return float(norms.norm())
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def due(done: int, every: int, last: int) -> bool:
    """Whether periodic work (logging, previews, checkpoints) runs after step ``done`` of ``last``: every
    ``every`` steps, and always at the last step; ``every = 0`` means at the last step only."""
    if every < 0:
        raise ValueError(f"interval must be >= 0 (0: last step only), got {every}")
    return done == last or (every > 0 and done % every == 0)


def count_parameters(module: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


def set_num_threads(n: int | None) -> None:
    """Cap intra-op CPU threads (CPU torch oversubscribes badly on small machines)."""
    if n:
        torch.set_num_threads(int(n))


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """``set_num_threads(n)`` for the block, then the caller's thread count again (a recipe that runs
    inside a longer process, e.g. a test session pinned to one thread, leaves it as it found it)."""
    before = torch.get_num_threads()
    set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- run folders
@dataclass(frozen=True)
class RunDir:
    """``<root>/<package>/<name>/`` holding ``config.yaml``, ``checkpoints/``, ``images/``,
    ``tb/`` (TensorBoard) and ``metrics.jsonl``."""

    path: Path

    @classmethod
    def create(cls, root: str | os.PathLike, package: str, name: str) -> RunDir:
        run = cls(Path(root) / package / name)
        from .atomic import check_output_path

        check_output_path(run.path, what="run folder")  # one line before any work, not a traceback later
        if is_main_process():
            for sub in (run.checkpoints, run.images, run.tensorboard):
                sub.mkdir(parents=True, exist_ok=True)
        return run

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def images(self) -> Path:
        return self.path / "images"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep the rows of a ``metrics.jsonl`` with ``step <= step`` (atomically); returns how many were dropped.
    Unreadable lines (a row cut by a crash) are dropped too."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            ok = int(row["step"]) <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            keep.append(line)
        else:
            dropped += 1
    if dropped:
        from .atomic import atomic_write_text

        atomic_write_text(path, "".join(f"{line}\n" for line in keep))
    return dropped


class RunLogger:
    """Rank-0 metric logging to the console, TensorBoard and ``metrics.jsonl``; silent elsewhere.

    ``resume_step``: the step training resumes from; rows of ``metrics.jsonl`` logged after it (by the run
    that crashed, and that will be logged again) are dropped first, so the file keeps one row per step and
    split."""

    def __init__(
        self, run: RunDir, enabled: bool | None = None, tensorboard: bool = True, resume_step: int | None = None
    ):
        self.run = run
        self.enabled = is_main_process() if enabled is None else enabled
        self._tb = None
        if self.enabled:
            run.path.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_metrics(run.metrics, resume_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run.tensorboard))
            self._jsonl = open(run.metrics, "a", encoding="utf-8")  # noqa: SIM115

    def log(self, step: int, metrics: Mapping[str, float], prefix: str = "train", console: bool = False) -> None:
        if not self.enabled:
            return
        clean = {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), "split": prefix, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)
        if console:
            log.info("%s step %d: %s", prefix, step, ", ".join(f"{k}={v:.4g}" for k, v in clean.items()))

    def close(self) -> None:
        if self.enabled:
            if self._tb is not None:
                self._tb.close()
            self._jsonl.close()
            self.enabled = False

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable | None = None, total: int | None = None, desc: str = "", initial: int = 0,
             **kwargs: Any):
    """tqdm that only draws on rank 0."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not is_main_process(),
                dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------------- data loading
def index_rng(*keys: int) -> np.random.Generator:
    """A numpy generator determined only by integer keys (e.g. seed, epoch, sample index).

    Datasets that draw random augmentations per item should use it, so a resumed run, any number
    of workers and any rank produce the same augmentations for the same (epoch, index).
    """
    return np.random.default_rng([int(k) % 2**63 for k in keys])


@contextlib.contextmanager
def keyed_rng(*keys: int) -> Iterator[None]:
    """Seed python's, numpy's global and torch's CPU generators from integer ``keys`` (e.g. seed, step,
    global sample position) for the block, then restore their previous states.

    Code that draws from the global generators (augmentations, noise) run per sample inside it gives the
    same draws for the same keys whatever the batch split: the deterministic mode in which N ranks and
    one process at the same global batch agree (issue 18). CUDA generators are not touched.
    """
    seq = np.random.SeedSequence([int(k) % 2**63 for k in keys])
    s32, s64 = (int(x) for x in seq.generate_state(2, dtype=np.uint32))
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    random.seed(s32)
    np.random.seed(s32)  # noqa: NPY002
    torch.manual_seed((s32 << 32) | s64)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.set_rng_state(torch_state)


def global_positions(local_batch: int) -> list[int]:
    """Position of each local sample in the global batch as :class:`ResumableLoader` shards it
    (``DistributedSampler`` deals the global batch out rank by rank): ``j * world_size + rank``. With
    one process at the global batch size the same sample has the same position."""
    from .distributed import get_rank, get_world_size

    w, r = get_world_size(), get_rank()
    return [j * w + r for j in range(int(local_batch))]


class ResumableLoader:
    """Step-indexed batches over a dataset, sharded over ranks, restartable at any step.

    Epoch ``e`` uses the permutation of ``DistributedSampler(seed, epoch=e)``; step ``s`` is batch
    ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``. ``iterate(start_step)`` skips
    ahead without loading the skipped batches, so N steps straight equal N/2 + resume + N/2. A
    dataset with ``set_epoch(epoch)`` is told the epoch before each one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, num_workers: int = 0, collate_fn=None, pin_memory: bool = False):
        from .distributed import make_sampler

        if len(dataset) == 0:
            raise ValueError("the dataset is empty: check the data folder and its file pattern")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.sampler = make_sampler(dataset, shuffle=shuffle, seed=seed, drop_last=False)
        per_rank = len(self.sampler)
        self.drop_last = drop_last and per_rank >= batch_size
        self.steps_per_epoch = per_rank // batch_size if self.drop_last else math.ceil(per_rank / batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"dataset of {len(dataset)} items over {get_world_size()} ranks gives no batch of {batch_size}"
            )

    def _batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        idx = list(self.sampler)
        return [idx[i: i + self.batch_size] for i in range(0, self.steps_per_epoch * self.batch_size,
                                                           self.batch_size) if idx[i: i + self.batch_size]]

    def iterate(self, start_step: int = 0, max_steps: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(step, batch)`` from ``start_step`` until ``max_steps`` (forever when None)."""
        step = start_step
        while max_steps is None or step < max_steps:
            epoch, offset = divmod(step, self.steps_per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            batches = self._batches(epoch)[offset:]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 97 + get_rank())
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                                collate_fn=self.collate_fn, pin_memory=self.pin_memory, generator=g,
                                persistent_workers=False)
            for batch in loader:
                if max_steps is not None and step >= max_steps:
                    return
                yield step, batch
                step += 1


class BucketLoader:
    """Step-indexed batches in which every batch holds items of one bucket (e.g. one latent resolution), each
    bucket with its own per-rank batch size; sharded over ranks and restartable at any step like
    :class:`ResumableLoader`.

    Epoch ``e``: each bucket's items are permuted by ``index_rng(seed, e, bucket)`` and cut into global batches
    of ``batch_sizes[bucket] · world_size`` items (a bucket's remainder is dropped); the global batches are put
    in the order of ``index_rng(seed, e)``, and rank ``r`` takes the ``r``-th slice of each. Every rank
    therefore runs the same number of steps on the same bucket, and an epoch has the same length each time.
    """

    def __init__(self, dataset: Dataset, buckets: Sequence[Any], batch_sizes: Mapping[Any, int], seed: int = 0,
                 num_workers: int = 0, collate_fn=None, pin_memory: bool = False,
                 world_size: int | None = None, rank: int | None = None):
        if len(buckets) != len(dataset):
            raise ValueError(f"{len(buckets)} bucket labels for a dataset of {len(dataset)} items")
        self.dataset, self.seed = dataset, seed
        self.num_workers, self.collate_fn, self.pin_memory = num_workers, collate_fn, pin_memory
        self.world = get_world_size() if world_size is None else int(world_size)
        self.rank = get_rank() if rank is None else int(rank)
        self.keys = sorted(set(buckets), key=str)
        self.members = {k: [i for i, b in enumerate(buckets) if b == k] for k in self.keys}
        self.batch_sizes = {}
        for k in self.keys:
            b = int(batch_sizes[k])
            if b < 1 or len(self.members[k]) < b * self.world:
                raise ValueError(
                    f"bucket {k}: {len(self.members[k])} items cannot fill one batch of {b} per rank "
                    f"on {self.world} rank(s); lower its batch size or add data"
                )
            self.batch_sizes[k] = b
        self.steps_per_epoch = sum(
            len(self.members[k]) // (self.batch_sizes[k] * self.world) for k in self.keys
        )

    def _batches(self, epoch: int) -> list[list[int]]:
        glob = []
        for j, k in enumerate(self.keys):
            idx = [self.members[k][i] for i in index_rng(self.seed, epoch, j).permutation(len(self.members[k]))]
            g = self.batch_sizes[k] * self.world
            glob += [idx[i: i + g] for i in range(0, len(idx) - g + 1, g)]
        order = index_rng(self.seed, epoch).permutation(len(glob))
        out = []
        for o in order:
            b = glob[o]
            n = len(b) // self.world
            out.append(b[self.rank * n: (self.rank + 1) * n])
        return out

    def iterate(self, start_step: int = 0, max_steps: int | None = None) -> Iterator[tuple[int, Any]]:
        """Yield ``(step, batch)`` from ``start_step`` until ``max_steps`` (forever when None)."""
        step = start_step
        while max_steps is None or step < max_steps:
            epoch, offset = divmod(step, self.steps_per_epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 97 + self.rank)
            loader = DataLoader(self.dataset, batch_sampler=self._batches(epoch)[offset:],
                                num_workers=self.num_workers, collate_fn=self.collate_fn,
                                pin_memory=self.pin_memory, generator=g, persistent_workers=False)
            for batch in loader:
                if max_steps is not None and step >= max_steps:
                    return
                yield step, batch
                step += 1


# --------------------------------------------------------------------------------------------------
# Preemption (SIGTERM from SLURM, Kubernetes, torchrun's agent)
# --------------------------------------------------------------------------------------------------

from .cli import EXIT_PREEMPTED  # noqa: E402,F401  (143 = 128 + SIGTERM; re-exported for training loops)


class PreemptionGuard:
    """Turn SIGTERM (and the optional ``signals``) into a request to stop at the end of the current step.

    ``with PreemptionGuard() as stop: ... if stop.should_stop(): save; break``. Under DDP
    ``should_stop`` takes the maximum of every rank's flag (one scalar all-reduce per call), so all
    ranks leave at the same step and the rank-0 checkpoint holds that step. The previous handlers are
    restored on exit; outside the main thread (where Python cannot install handlers) it never fires.
    """

    def __init__(self, signals: Iterable[int] | None = None):
        import signal

        self.signals = tuple(signals) if signals is not None else (signal.SIGTERM,)
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (signal handler signature)
        self.received = signum

    def __enter__(self) -> PreemptionGuard:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def should_stop(self) -> bool:
        from .distributed import is_distributed

        flag = self.received is not None
        if is_distributed():
            import torch.distributed as dist

            from .distributed import _reduce_device

            t = torch.tensor([1.0 if flag else 0.0], device=_reduce_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def checkpoint_step(self, done: int, every: int, total: int, save: Callable[[int], Any]) -> bool:
        """End of step ``done``: ``save(done)`` when :func:`due` or when stopping (once); True when the loop
        must leave (every rank at the same step)."""
        saved = due(done, every, total)
        if saved:
            save(done)
        if not self.should_stop():
            return False
        if not saved:
            save(done)
        return True

    @property
    def signal_name(self) -> str:
        import signal

        return signal.Signals(self.received).name if self.received is not None else "a signal on another rank"

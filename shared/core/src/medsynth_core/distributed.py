"""Distributed helpers: one code path for a single process and for ``torchrun`` (DDP).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; when they are absent everything
falls back to a single process (rank 0 of 1) without touching ``torch.distributed``. The backend
is NCCL when the device is CUDA and gloo otherwise, so ``torchrun --nproc_per_node=2`` works on a
CPU-only machine.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``None``/"auto" picks ``cuda:<local_rank>`` when CUDA is available, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device '{device}' was requested but CUDA is not available; use device=cpu")
    return device


_SESSIONS = 0  # process groups this process has created (see init_distributed)


def init_distributed(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group from torchrun's environment, or return single-process info.

    Safe to call twice: an already initialised group is reused.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        global _SESSIONS
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun's rendezvous store outlives a process group, and destroy_process_group() resets
        # torch's group counter, so a second group in the same process would read the first group's
        # (stale) gloo/NCCL addresses from the store and could hang. A per-session key prefix keeps
        # the groups apart (every rank runs the same code, so the counters agree). The agent's store
        # also outlives an elastic restart (torchrun --max-restarts): the restart count keeps the new
        # workers from reading the killed round's addresses (seen: "Connection refused" in round 2).
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        _SESSIONS += 1
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"medsynth_restart_{restart}_session_{_SESSIONS}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def cleanup() -> None:
    """Destroy the process group if one exists (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str | torch.device | None = None) -> Iterator[DistInfo]:
    """``with distributed_session() as info:`` — init, run, and always shut down, also on errors."""
    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _reduce_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_dict(
    values: Mapping[str, float | int | torch.Tensor], op: str = "mean"
) -> dict[str, float]:
    """Reduce a flat dict of scalars over all ranks; ``op`` is "mean", "sum", "max" or "min".

    Keys are sorted so every rank packs the same vector. Single process: returns floats unchanged.
    """
    if op not in ("mean", "sum", "max", "min"):
        raise ValueError(f"op must be mean|sum|max|min, got {op!r}")
    keys = sorted(values)
    vec = torch.tensor(
        [float(v.detach().item() if isinstance(v, torch.Tensor) else v) for v in (values[k] for k in keys)],
        dtype=torch.float64,
        device=_reduce_device(),
    )
    if is_distributed() and keys:
        red = {"mean": dist.ReduceOp.SUM, "sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
               "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(vec, op=red)
        if op == "mean":
            vec /= get_world_size()
    return {k: float(v) for k, v in zip(keys, vec.cpu().tolist())}


def all_gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor along dim 0 from every rank (same shape on all ranks)."""
    if not is_distributed():
        return t
    src = t.to(_reduce_device())
    parts = [torch.empty_like(src) for _ in range(get_world_size())]
    dist.all_gather(parts, src)
    return torch.cat(parts).to(t.device)


def make_sampler(
    dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> DistributedSampler:
    """A ``DistributedSampler`` that also works without a process group (one replica).

    Every rank sees the same permutation for a given (seed, epoch) and takes its own stride of it;
    call ``sampler.set_epoch(epoch)`` each epoch.
    """
    return DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=shuffle, seed=seed,
        drop_last=drop_last,
    )


def seed_everything(seed: int, per_rank: bool = True) -> int:
    """Seed python, numpy and torch (CPU and CUDA); with ``per_rank`` each rank gets ``seed + rank``.

    Returns the seed that was used on this rank.
    """
    s = int(seed) + (get_rank() if per_rank else 0)
    random.seed(s)
    np.random.seed(s % 2**32)  # noqa: NPY002 (seeds the legacy global RNG libraries use)
    torch.manual_seed(s)
    return s


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


def wrap_ddp(module: torch.nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> torch.nn.Module:
    """Wrap in DDP when running distributed; otherwise return the module unchanged."""
    if not info.distributed:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module  # nothing to synchronise (frozen network)
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        module, device_ids=ids, find_unused_parameters=find_unused_parameters
    )


def torchrun_command(*args: str, nproc_per_node: int = 2) -> list[str]:
    """The command that runs ``args`` (a script path, or ``"-m", "module", ...``) under torchrun on
    this machine with ``nproc_per_node`` processes and a free rendezvous port (for launching DDP jobs
    from Python, e.g. tests)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}",
            "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", *args]

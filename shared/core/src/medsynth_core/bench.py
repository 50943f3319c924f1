"""Shared benchmark runner: train-step time, samples/s, peak memory and inference latency.

A package registers cases in ``<import_name>/bench.py`` as ``def cases(config: str) -> list[BenchCase]``
(``config`` is "demo" or "paper"); ``tools/bench.py`` runs them all and writes one JSON report.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# ``run.channels_last`` for every case (tools/bench.py --channels-last): auto (CUDA only) | on | off
CHANNELS_LAST = "auto"


def layout(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """The memory layout training would give ``module`` under the bench's ``CHANNELS_LAST`` setting (cases
    call it where their trainer calls ``training.to_channels_last``)."""
    from .training import channels_last_enabled, to_channels_last

    return to_channels_last(module, channels_last_enabled(CHANNELS_LAST, device))


@dataclass
class BenchCase:
    """``setup(device)`` returns a dict with ``train_step`` and/or ``infer`` (no-argument callables)
    and ``batch_size``; it is called once, outside the timed region."""

    name: str
    setup: Callable[[torch.device], dict[str, Any]]
    description: str = ""


def _proc_status_kb(field: str) -> float | None:
    path = Path("/proc/self/status")
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since the last reset on Linux)."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def run_case(case: BenchCase, device: torch.device, warmup: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Measure one case; returns seconds (median), samples/s and peak memory in MiB."""
    gc.collect()
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    state = case.setup(device)
    batch = int(state.get("batch_size", 1))
    out: dict[str, Any] = {"name": case.name, "description": case.description, "batch_size": batch,
                           "device": str(device)}
    if "train_step" in state:
        t = _time(state["train_step"], device, warmup, repeats)
        out["train_step_s"] = statistics.median(t)
        out["train_samples_per_s"] = batch / out["train_step_s"]
    if "infer" in state:
        t = _time(state["infer"], device, warmup, repeats)
        out["infer_latency_s"] = statistics.median(t)
        out["infer_samples_per_s"] = int(state.get("infer_batch_size", batch)) / out["infer_latency_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    for k in ("params", "notes"):
        if k in state:
            out[k] = state[k]
    del state
    gc.collect()
    return out

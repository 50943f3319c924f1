"""Mixed precision (``run.amp`` / ``--amp``): ``off`` | ``bf16`` | ``fp16`` autocast on CUDA.

The official code imports GradScaler/autocast but never uses them (spec §3), so ``off`` is the faithful
default. AMP is CUDA-only: on the CPU every mode resolves to ``off`` (a plain fp32 run), so CPU results
never change. ``fp16`` needs a GradScaler (:func:`grad_scaler`); ``bf16`` and ``off`` get a disabled one,
whose ``scale``/``step``/``update`` are exactly ``loss``/``optimizer.step()``/nothing.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from medsynth_core.cli import UserError

AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

log = logging.getLogger("fda_vae")


def resolve_amp(mode: str, device: torch.device | str, source: str = "run.amp") -> str:
    """The mode that will run on ``device``: ``off`` on anything but CUDA (logged when that drops a request)."""
    if mode not in AMP_MODES:
        raise UserError(f"{source}={mode!r}: must be one of {', '.join(AMP_MODES)}")
    device = torch.device(device)
    if mode == "off":
        return "off"
    if device.type != "cuda":
        log.info("%s=%s ignored on %s: AMP is CUDA-only, this run is plain fp32", source, mode, device.type)
        return "off"
    if mode == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"{source}=bf16: this GPU does not support bfloat16; use fp16 or off")
    return mode


def autocast(mode: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a resolved mode on CUDA; a no-op context for ``off``."""
    if mode == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=_DTYPES[mode])


def grad_scaler(mode: str) -> torch.amp.GradScaler:
    """A GradScaler enabled only for fp16 (bf16 has fp32's exponent range and needs none)."""
    return torch.amp.GradScaler("cuda", enabled=mode == "fp16")

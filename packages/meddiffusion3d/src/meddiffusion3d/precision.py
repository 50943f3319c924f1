"""Mixed precision as a named mode, ``off`` | ``bf16`` | ``fp16`` (issue 16).

The official trainers use fp16 autocast + GradScaler for BiFlowNet (``train_BiFlowNet_SingleRes.py``) and
Lightning ``bf16-mixed`` (4×) or fp32 (8×) for the autoencoder. medsynth-core's ``training.autocast`` picks
bf16 whenever the GPU supports it, so here the mode is explicit. On CPU every mode runs in fp32 (autocast
is a no-op, the scaler disabled), so CPU results never depend on it. ``fp16`` always comes with a
GradScaler; ``bf16`` and ``off`` need none. Config booleans of older files map to the official mode of
the stage (``true``: AE ``bf16``, BiFlowNet ``fp16``; ``false``: ``off``).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

AmpMode = Literal["off", "bf16", "fp16"]
MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_mode(value: str | bool, when_true: str) -> str:
    """Normalise a config value (mode name or legacy bool) to a mode name; anything else raises."""
    if isinstance(value, bool):
        return when_true if value else "off"
    if value not in MODES:
        raise ValueError(f"amp must be one of {list(MODES)}, got {value!r}")
    return value


def autocast_dtype(device: torch.device | str, mode: str) -> torch.dtype | None:
    """The autocast dtype of ``mode`` on ``device``: None (fp32) on CPU or when off."""
    if torch.device(device).type != "cuda" or amp_mode(mode, "off") == "off":
        return None
    return _DTYPES[mode]


def autocast(device: torch.device | str, mode: str) -> contextlib.AbstractContextManager:
    dtype = autocast_dtype(device, mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def grad_scaler(device: torch.device | str, mode: str) -> torch.amp.GradScaler:
    """A GradScaler enabled exactly for fp16 on CUDA."""
    return torch.amp.GradScaler("cuda", enabled=autocast_dtype(device, mode) == torch.float16)

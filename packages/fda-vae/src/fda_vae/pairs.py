"""Slice-key helpers with no heavy imports (also used in subprocess tests of the pair order)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

SUFFIXES = (".nii.gz", ".nii")


def slice_key(path: str | os.PathLike) -> str:
    """``MR123_40.nii.gz`` → ``MR123_40``."""
    name = Path(path).name
    for s in SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return name


def patient_of(key: str) -> str:
    """The patient ID: the key up to the first ``_`` (spec §4)."""
    return key.split("_", 1)[0]


def pair_keys(keys_a: Iterable[str], keys_b: Iterable[str], sort: bool = True) -> list[str]:
    """Keys present in both phases. ``sort=True`` (spec §6.5 fix) is identical on every rank and process;
    ``False`` keeps the official set-iteration order, which changes with ``PYTHONHASHSEED``."""
    common = set(keys_a) & set(keys_b)
    return sorted(common) if sort else list(common)

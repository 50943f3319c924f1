"""Error types the command-line frame catches, in a module that imports nothing heavy (no torch), so
``<package> --help`` starts fast."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class OutputPathError(OSError):
    """An output path cannot be written (a file where a folder is needed, no permission, ...)."""

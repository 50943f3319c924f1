"""Atomic file output: write into a hidden folder beside the destination, fsync, ``os.replace``.

A crash (or exception) in the middle of writing leaves whatever was at the destination untouched
and removes the temporary folder. The temporary file has the destination's own name, so
format-sniffing writers (``.nii.gz``, ``.mha``) work, and companion files a writer adds (the
``.raw`` of an ``.mhd``) are moved into place too.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_path(path: str | os.PathLike, folder: bool = True, what: str = "output folder") -> Path:
    """Check, before any work and without creating anything, that ``path`` can be written as a folder
    (``folder=True``) or as a file: no existing file where a folder is needed (itself or a parent), no
    folder where a file is needed, and the nearest existing ancestor writable. Raises
    :class:`~medsynth_core.errors.OutputPathError` naming the path and the fix; returns ``Path(path)``."""
    from medsynth_core.errors import OutputPathError

    path = Path(path)
    if path.exists():
        if folder and not path.is_dir():
            raise OutputPathError(f"{path}: {what} is an existing file, not a folder; choose another path")
        if not folder and path.is_dir():
            raise OutputPathError(f"{path}: {what} is an existing folder, not a file; choose a file name")
        if not os.access(path if folder else path.parent, os.W_OK):
            raise OutputPathError(f"{path}: {what} is not writable (permission denied); choose another path")
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(
            f"{path}: {what} cannot be created because {parent} is a file, not a folder; choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"{path}: {what} cannot be created in {parent} (permission denied); choose a writable path"
        )
    return path


def _fsync(path: Path, directory: bool = False) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsynced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path named like ``path``; on success it (and companions) replace the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        yield tmp
        if not tmp.exists():
            raise OSError(f"{path}: the writer produced no file; check the format and permissions")
        for produced in sorted(tmp_dir.iterdir()):
            _fsync(produced)
        for companion in sorted(tmp_dir.iterdir()):
            if companion != tmp:
                os.replace(companion, path.parent / companion.name)
        os.replace(tmp, path)  # the named file last
        _fsync(path.parent, directory=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)

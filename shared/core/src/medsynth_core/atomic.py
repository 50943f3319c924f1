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

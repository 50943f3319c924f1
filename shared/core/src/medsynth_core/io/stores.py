"""Array stores for preprocessed datasets: HDF5 (h5py) and LMDB."""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsynth_core.atomic import atomic_output
from medsynth_core.io.image import MedicalIOError, _as_numpy, _err, _short

# --------------------------------------------------------------------------------------------------
# HDF5
# --------------------------------------------------------------------------------------------------


def write_h5(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    compression: str | None = "gzip",
) -> Path:
    """Atomically write ``arrays`` as datasets (``"a/b"`` keys create groups) and root ``attrs``."""
    import h5py

    path = Path(path)
    try:
        with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                arr = _as_numpy(value)
                comp = compression if arr.ndim > 0 and arr.size > 0 else None
                f.create_dataset(key, data=arr, compression=comp)
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
    except MedicalIOError:
        raise
    except Exception as exc:
        raise _err(
            path,
            f"writing HDF5 failed ({_short(exc)}); any previous file there is unchanged",
            "check the keys/values (numeric arrays, simple attributes), disk space and permissions",
        ) from exc
    return path


class H5ArrayReader:
    """Lazy HDF5 reader, safe with DataLoader workers.

    The file is opened on first access in each process (and reopened after a fork); pickling drops the
    handle. Keys are full dataset paths (``"group/name"``).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise _err(self.path, "HDF5 file does not exist", "check the path or create it with write_h5")
        self._file: Any = None
        self._pid: int | None = None

    def _h5(self) -> Any:
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = None  # never close a handle inherited through fork
            try:
                self._file = h5py.File(self.path, "r")
            except Exception as exc:
                raise _err(
                    self.path, f"cannot open HDF5 file ({exc})", "re-create or re-download it"
                ) from exc
            self._pid = os.getpid()
        return self._file

    def keys(self) -> list[str]:
        """All dataset paths, sorted."""
        import h5py

        names: list[str] = []
        self._h5().visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        return sorted(names)

    def _dataset(self, key: str) -> Any:
        f = self._h5()
        if key not in f:
            raise KeyError(f"{self.path}: no dataset {key!r}; available: {self.keys()[:20]}")
        return f[key]

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._dataset(key)[()])

    def __contains__(self, key: str) -> bool:
        return key in self._h5()

    def __len__(self) -> int:
        return len(self.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of a dataset without reading it."""
        return tuple(self._dataset(key).shape)

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        """Read only ``dataset[index]`` (int, slice or tuple thereof) from disk."""
        return np.asarray(self._dataset(key)[index])

    @property
    def attrs(self) -> dict[str, Any]:
        """Root attributes as a plain dict."""
        return {k: v for k, v in self._h5().attrs.items()}

    def close(self) -> None:
        """Close the handle (reopened automatically on next access)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid = None, None

    def __enter__(self) -> H5ArrayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_file": None, "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# --------------------------------------------------------------------------------------------------
# LMDB
# --------------------------------------------------------------------------------------------------

_LMDB_MAGIC = b"MSNA1"


def _encode_array(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr)
    if arr.dtype.hasobject:
        raise ValueError("object arrays cannot be stored in LMDB; convert to a numeric dtype")
    header = json.dumps({"dtype": arr.dtype.str, "shape": list(arr.shape)}).encode()
    return _LMDB_MAGIC + struct.pack("<I", len(header)) + header + arr.tobytes()


def _decode_array(buf: bytes | memoryview) -> np.ndarray:
    buf = memoryview(buf)
    if bytes(buf[: len(_LMDB_MAGIC)]) != _LMDB_MAGIC:
        raise ValueError("value is not an array written by LMDBArrayWriter")
    start = len(_LMDB_MAGIC)
    (hlen,) = struct.unpack("<I", buf[start : start + 4])
    meta = json.loads(bytes(buf[start + 4 : start + 4 + hlen]))
    data = np.frombuffer(buf[start + 4 + hlen :], dtype=np.dtype(meta["dtype"]))
    return data.reshape(meta["shape"]).copy()


class LMDBArrayWriter:
    """Write numpy arrays into an LMDB database (a folder) under string keys.

    Each value stores a dtype+shape header and the raw C-order bytes. ``dtype`` (e.g. ``np.float16``)
    casts floating arrays for storage. Call :meth:`commit` (or use as a context manager) to persist.
    """

    def __init__(self, path: str | os.PathLike, map_size: int = 2**34, dtype: Any = None):
        import lmdb

        self.path = Path(path)
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._env = lmdb.open(str(self.path), map_size=int(map_size), subdir=True, meminit=False)
        except Exception as exc:
            raise _err(
                self.path, f"cannot create LMDB database ({exc})", "check permissions/disk space"
            ) from exc
        self._txn = self._env.begin(write=True)

    def put(self, key: str, array: Any, dtype: Any = None) -> None:
        """Store ``array`` under ``key`` (``dtype`` overrides the writer's storage dtype)."""
        arr = _as_numpy(array)
        target = np.dtype(dtype) if dtype is not None else self.dtype
        if target is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(target)
        try:
            self._txn.put(key.encode(), _encode_array(arr))
        except Exception as exc:
            raise _err(
                self.path, f"storing {key!r} failed ({type(exc).__name__}: {exc})", "increase map_size"
            ) from exc

    def commit(self) -> None:
        """Persist everything put so far and start a new transaction."""
        self._txn.commit()
        self._txn = self._env.begin(write=True)

    def close(self) -> None:
        """Commit and close the database."""
        if self._txn is not None:
            self._txn.commit()
            self._txn = None
            self._env.close()

    def __enter__(self) -> LMDBArrayWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None and self._txn is not None:
            self._txn.abort()
            self._txn = None
            self._env.close()
        else:
            self.close()


# Read-only environments shared per (process, folder): LMDB forbids opening one twice in a process.
_LMDB_ENVS: dict[tuple[int, str], list[Any]] = {}


def _lmdb_acquire(path: Path) -> Any:
    import lmdb

    key = (os.getpid(), os.path.realpath(path))
    entry = _LMDB_ENVS.get(key)
    if entry is None:
        try:
            env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, subdir=True)
        except Exception as exc:
            raise _err(
                path, f"cannot open LMDB database ({exc})", "re-create it with LMDBArrayWriter"
            ) from exc
        entry = _LMDB_ENVS[key] = [env, 0]
    entry[1] += 1
    return entry[0]


def _lmdb_release(path: Path) -> None:
    key = (os.getpid(), os.path.realpath(path))
    entry = _LMDB_ENVS.get(key)
    if entry is not None:
        entry[1] -= 1
        if entry[1] <= 0:
            entry[0].close()
            del _LMDB_ENVS[key]


class LMDBArrayReader:
    """Lazy read-only LMDB array reader (opened per process with ``lock=False``; DataLoader-safe).

    Readers of the same folder in one process share a single environment.

    ``dtype`` casts arrays on read (e.g. back to float32 after float16 storage).
    """

    def __init__(self, path: str | os.PathLike, dtype: Any = None):
        self.path = Path(path)
        self.dtype = None if dtype is None else np.dtype(dtype)
        if not (self.path / "data.mdb").is_file():
            raise _err(
                self.path,
                "LMDB database does not exist (no data.mdb in that folder)",
                "check the path or build the database with LMDBArrayWriter",
            )
        self._env: Any = None
        self._pid: int | None = None

    def _db(self) -> Any:
        if self._env is None or self._pid != os.getpid():
            self._env = None  # an environment inherited through fork must not be used or closed
            self._env = _lmdb_acquire(self.path)
            self._pid = os.getpid()
        return self._env

    def __len__(self) -> int:
        return int(self._db().stat()["entries"])

    def keys(self) -> list[str]:
        """All keys, in LMDB (byte-sorted) order."""
        with self._db().begin() as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def __contains__(self, key: str) -> bool:
        with self._db().begin() as txn:
            return txn.get(key.encode()) is not None

    def __getitem__(self, key: str) -> np.ndarray:
        with self._db().begin(buffers=True) as txn:
            buf = txn.get(key.encode())
            if buf is None:
                raise KeyError(f"{self.path}: no entry {key!r} in the LMDB database")
            arr = _decode_array(buf)
        return arr.astype(self.dtype) if self.dtype is not None else arr

    def close(self) -> None:
        """Release the environment (reopened automatically on next access)."""
        if self._env is not None and self._pid == os.getpid():
            _lmdb_release(self.path)
        self._env, self._pid = None, None

    def __enter__(self) -> LMDBArrayReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "_env": None, "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

"""YAML configs mapped onto typed dataclasses, validated, with ``key.sub=value`` overrides.

A package describes its config as (nested) dataclasses with type annotations and defaults::

    @dataclass
    class Optim:
        lr: float = 1e-4
        betas: tuple[float, float] = (0.5, 0.999)

    @dataclass
    class Config:
        optim: Optim = field(default_factory=Optim)
        mode: Literal["a", "b"] = "a"

    cfg = load_config(Config, "configs/paper.yaml", ["optim.lr=2e-4"])

Unknown keys, wrong types and values rejected by a dataclass's ``__post_init__`` raise
:class:`ConfigError` naming the file and the dotted key (with the valid keys and a close match).

One vocabulary (issue 17): every package's top-level config has a ``run`` section (:class:`RunSection`: name,
root, seed, device, threads, keep_last, deterministic) and a ``train`` section spelling the shared keys
``steps``, ``batch_size``, ``lr``, ``ckpt_every``, ``sample_every``, ``log_every`` and ``num_workers``. A
config class lists the spellings it replaced in ``RENAMED`` (``{"out_dir": "run.root", ...}``): a YAML file
or override that uses one is refused with the new name, and :func:`config_from_dict` (checkpoints written
before the rename) moves them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .atomic import atomic_write_text

T = TypeVar("T")


CHANNELS_LAST = ("auto", "on", "off")


def channels_last_setting(value: str | bool) -> str:
    """``run.channels_last`` as one of :data:`CHANNELS_LAST` (YAML reads a bare on/off as a bool)."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


@dataclasses.dataclass
class RunSection:
    """The ``run`` section every package shares: where a run is written (``<root>/<package>/<name>/``), its
    seed, device and CPU threads, how many checkpoints are kept, and the deterministic-DDP switch (issue 18:
    every random draw keyed by seed, step and global sample position, so N ranks equal one process).
    Packages subclass it for their defaults or an ``amp`` switch."""

    name: str = "run"
    root: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = torch's default
    keep_last: int = 3  # periodic checkpoints kept (plus the best where a package tracks one)
    deterministic: bool = False
    # issue 19: convolution weights in the channels-last layout (auto: on CUDA only, so CPU results never
    # change; on: also on CPU, where oneDNN's NHWC kernels are faster but sum in another order)
    channels_last: str | bool = "auto"

    def __post_init__(self) -> None:
        require(bool(str(self.name).strip()), "name", "must not be empty")
        self.channels_last = channels_last_setting(self.channels_last)
        require(self.channels_last in CHANNELS_LAST, "channels_last", "must be auto, on or off")
        require(self.threads >= 0, "threads", "must be >= 0 (0 = torch's default)")
        require(self.keep_last >= 1, "keep_last", "must be >= 1")


# the shared keys of a package's ``train`` section (documentation and the vocabulary test)
TRAIN_KEYS = ("steps", "batch_size", "lr", "ckpt_every", "sample_every", "log_every", "num_workers")


def renamed_keys(cls: type) -> dict[str, str]:
    """``{old dotted key: new dotted key}`` a config class declares in ``RENAMED``."""
    return dict(getattr(cls, "RENAMED", None) or {})


def _pop_dotted(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    *parents, leaf = dotted.split(".")
    node: Any = data
    for p in parents:
        node = node.get(p) if isinstance(node, Mapping) else None
    if isinstance(node, dict) and leaf in node:
        return True, node.pop(leaf)
    return False, None


def _has_dotted(data: Mapping[str, Any], dotted: str) -> bool:
    node: Any = data
    for p in dotted.split("."):
        if not isinstance(node, Mapping) or p not in node:
            return False
        node = node[p]
    return True


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value


def _copy_tree(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def migrate_renamed(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with every old spelling of ``cls.RENAMED`` moved to its new key (a new key already given
    wins); for configs stored in checkpoints written before the rename."""
    out = _copy_tree(data)
    for old, new in renamed_keys(cls).items():
        found, value = _pop_dotted(out, old)
        if found and not _has_dotted(out, new):
            _set_dotted(out, new, value)
    return out


def refuse_renamed(cls: type, data: Mapping[str, Any], source: str) -> None:
    """A user's YAML or override spelling a key the old way: one line with the new spelling."""
    old = [(o, n) for o, n in renamed_keys(cls).items() if _has_dotted(data, o)]
    if old:
        pairs = ", ".join(f"'{o}' is now '{n}'" for o, n in old)
        raise ConfigError(f"{source}: {pairs} (one vocabulary across the medsynth packages); rename and rerun")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the source and the key."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check/convert ``value`` to the annotation ``tp``."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: key '{key}' expects {expected}, got {value!r} ({type(value).__name__})"
        )

    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise fail(f"a mapping of {tp.__name__} fields")
        return _from_mapping(tp, value, key, source)
    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if args and (len(args) == 2 and args[1] is Ellipsis):
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise fail(f"a list of {len(args)} values")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        return tuple(value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise fail("a mapping")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise fail("true/false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise fail("an integer")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise fail("a number")
        if not math.isfinite(number):  # NaN/Inf pass every `x > 0` style check downstream (issue 18)
            raise fail("a finite number")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise fail("a path")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail(_type_name(tp))


def _from_mapping(cls: type[T], data: Mapping[str, Any], prefix: str, source: str) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for k in data:
        if k not in fields:
            where = f"under '{prefix}'" if prefix else "at the top level"
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            dotted = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(
                f"{source}: unknown key '{dotted}'{hint} Valid keys {where}: {', '.join(fields)}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}" if prefix else name, source)
        elif dataclasses.is_dataclass(hints[name]) and f.default is dataclasses.MISSING:
            # nested section left out: build its defaults (validated by its __post_init__ too)
            kwargs[name] = _from_mapping(hints[name], {}, f"{prefix}.{name}" if prefix else name, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: required key '{prefix + '.' if prefix else ''}{name}' is missing")
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(f"{source}: invalid value{where}: {exc}") from exc
    _check_data_source(obj, prefix, source)
    return obj


def _check_data_source(section: Any, prefix: str, source: str) -> None:
    """A data section whose ``root`` (empty by default) is set while ``source: phantom`` (or ``synthetic:
    true``) says to train on phantoms: the folder would be ignored without a word (issue 18); refuse it."""
    root_field = next((f for f in dataclasses.fields(section) if f.name == "root"), None)
    if root_field is None or root_field.default or not getattr(section, "root", None):
        return
    dot = f"{prefix}." if prefix else ""
    if getattr(section, "source", None) == "phantom":
        hints = typing.get_type_hints(type(section))
        others = [a for a in typing.get_args(hints.get("source")) if a != "phantom"]
        switch, fix = "source' is phantom", f"pass {dot}source={others[0] if others else '...'} to train on it"
    elif getattr(section, "synthetic", None) is True:
        switch, fix = "synthetic' is true", f"pass {dot}synthetic=false to train on it"
    else:
        return
    raise ConfigError(
        f"{source}: '{dot}root' is set ({section.root}) but '{dot}{switch}, so the folder would be ignored and "
        f"training would run on phantoms; {fix}, or drop {dot}root"
    )


def config_from_dict(cls: type[T], data: Mapping[str, Any] | None, source: str = "config") -> T:
    """Build and validate a config dataclass from a (nested) mapping; old spellings (``cls.RENAMED``, e.g.
    in a checkpoint written before issue 17's vocabulary) are moved to their new keys."""
    return _from_mapping(cls, migrate_renamed(cls, data or {}), "", source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists, paths as strings) that :func:`config_from_dict` reads back."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(cfg)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1,2]"]`` → ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with another override of '{p}'")
        node[parts[-1]] = value
    return out


def merge_dicts(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge; mappings merge, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge_dicts(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> T:
    """Defaults ← ``base`` ← YAML file ← command-line overrides, validated into ``cls``."""
    data: dict[str, Any] = dict(base or {})
    source = "config"
    if path is not None:
        data = merge_dicts(data, read_yaml(path))
        source = str(path)
    if overrides:
        data = merge_dicts(data, parse_overrides(overrides))
        source += " (with command-line overrides)"
    refuse_renamed(cls, data, source)
    return config_from_dict(cls, data, source=source)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config (dataclass or mapping) as YAML, atomically."""
    data = config_to_dict(cfg)
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def require(condition: bool, key: str, message: str) -> None:
    """For ``__post_init__`` checks: ``require(self.lr > 0, "lr", "must be > 0")``."""
    if not condition:
        raise ValueError(f"'{key}' {message}")


def bundled_configs(package_file: str | os.PathLike) -> Path:
    """The ``configs/`` folder of a method package, given any module ``__file__`` at its top level.

    Installed from a wheel, the configs ship inside the package (``<import_name>/configs``); in a
    source checkout they sit beside ``src/`` (``packages/<name>/configs``).
    """
    here = Path(package_file).resolve().parent
    candidates = (here / "configs", here.parents[1] / "configs")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"no configs folder found for {here.name} (looked in {', '.join(str(c) for c in candidates)}); "
        "reinstall the package or pass --config explicitly"
    )


def config_file(value: str | os.PathLike | None, package_file: str | os.PathLike) -> str | os.PathLike | None:
    """A ``--config`` value as a path: a bare name (``demo``, ``paper``, ...) is that YAML of the package's
    bundled ``configs/`` (issue 17: the same shorthand in every package); a path is returned unchanged.

    A bare name that is neither an existing file nor a bundled config is refused, naming the bundled ones."""
    if value is None:
        return None
    text = str(value)
    if "/" in text or os.sep in text or text.endswith((".yaml", ".yml")) or Path(text).exists():
        return value
    folder = bundled_configs(package_file)
    candidate = folder / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    raise ConfigError(f"--config {text}: no such file and no bundled config of that name; bundled: "
                      f"{', '.join(names)} (or give the path of a YAML file)")

"""Discover the method packages of the workspace from ``packages/*/pyproject.toml``."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class MethodPackage:
    name: str  # distribution and console-script name, e.g. "fda-vae"
    import_name: str  # e.g. "fda_vae"
    path: Path


def discover_packages(root: Path = ROOT) -> list[MethodPackage]:
    found = []
    for pyproject in sorted((root / "packages").glob("*/pyproject.toml")):
        meta = tomllib.loads(pyproject.read_text())["project"]
        script = meta["scripts"][meta["name"]]  # "<import_name>.cli:main"
        found.append(MethodPackage(meta["name"], script.split(".")[0], pyproject.parent))
    return found


def select(names: list[str] | None, root: Path = ROOT) -> list[MethodPackage]:
    pkgs = discover_packages(root)
    if not names:
        return pkgs
    by_name = {p.name: p for p in pkgs} | {p.import_name: p for p in pkgs}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown package(s) {unknown}; choose from {[p.name for p in pkgs]}")
    return [by_name[n] for n in names]

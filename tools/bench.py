"""Benchmark every method package: train-step time, samples/s, peak memory, inference latency.

Each package registers its cases in ``<import_name>/bench.py`` (``cases(config) -> list[BenchCase]``);
this script runs the ``demo`` configs, and the ``paper`` configs too with ``--paper`` (heavy).

    uv run tools/bench.py                       # demo configs, all packages, CPU
    uv run tools/bench.py --paper --device cuda --package meddiffusion3d
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import ROOT, select  # noqa: E402

from medsynth_core.atomic import atomic_write_text  # noqa: E402
from medsynth_core.bench import run_case  # noqa: E402


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux; ``platform.processor()`` elsewhere, often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", help="package to bench (repeatable); default: all")
    ap.add_argument("--paper", action="store_true", help="also bench the paper configs (heavy)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "report.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report = {
        "machine": {"platform": platform.platform(), "processor": cpu_model(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "packages": {},
    }
    configs = ["demo", "paper"] if args.paper else ["demo"]
    for pkg in select(args.package):
        try:
            module = importlib.import_module(f"{pkg.import_name}.bench")
        except ModuleNotFoundError as exc:
            if exc.name != f"{pkg.import_name}.bench":
                raise
            report["packages"][pkg.name] = {"status": "not implemented (no bench module yet)"}
            print(f"{pkg.name}: no benchmarks registered yet", flush=True)
            continue
        entry = {}
        for config in configs:
            entry[config] = []
            for case in module.cases(config):
                print(f"{pkg.name} [{config}] {case.name} ...", flush=True)
                result = run_case(case, device, warmup=args.warmup, repeats=args.repeats)
                entry[config].append(result)
                print("   " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in result.items() if k not in ("description", "name")))
        report["packages"][pkg.name] = entry
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

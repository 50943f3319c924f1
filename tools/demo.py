"""Run the ``demo`` verb of every method package (or those named with ``--package``).

Each demo trains its demo recipe on the embedded phantom data, checkpoints, resumes once, and scores
the trained model on held-out phantom subjects against named trivial baselines (``../shared/LEARNING.md``),
writing ``runs/demo/<package>/{figure.png, metrics.json, heldout/}``. The summary prints, per package
and task, ours vs the best baseline (PSNR in dB, from ``metrics.json``).

Demos whose recipes use one torch thread (``demo_threads`` in the package's pyproject.toml) run side by
side, one per core, writing ``<package>/demo.log``; the others run alone with their progress bars here. On
2 cores: drdm and fda-vae together, then meddiffusion3d, mgdcr and uni-coal one by one.

    uv run tools/demo.py                    # all packages
    uv run tools/demo.py --package drdm     # one
    uv run tools/demo.py --cores 1          # strictly one at a time
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import ROOT, MethodPackage, select  # noqa: E402


def heldout_lines(metrics: dict) -> list[str]:
    """``task: ours X dB vs best baseline NAME Y dB (+Z)`` for every held-out block of a metrics.json."""
    held = metrics.get("heldout")
    if not isinstance(held, dict):
        return ["no held-out block in metrics.json"]
    blocks = {"": held} if "method" in held else {k: v for k, v in held.items() if isinstance(v, dict)}
    lines = []
    for task, block in blocks.items():
        if "method" not in block or not block.get("baselines"):
            continue
        best = max(block["baselines"], key=lambda n: block["baselines"][n] if block["baselines"][n] is not None
                   else float("-inf"))
        ours, base = block["method"], block["baselines"][best]
        if ours is None or base is None:
            lines.append(f"{task or 'heldout'}: not finite (ours {ours}, {best} {base})")
            continue
        lines.append(f"{task or 'heldout'}: ours {ours:.2f} dB vs best baseline {best} {base:.2f} dB "
                     f"({ours - base:+.2f}) over {block.get('cases', '?')} cases")
    return lines or ["no scored held-out task in metrics.json"]


def demo_threads(pkg: MethodPackage) -> int:
    """Torch threads the package's demo recipe uses (``[tool.medsynth] demo_threads`` in its pyproject.toml;
    default 2, the ``OMP_NUM_THREADS`` this tool sets). ``tests/test_tools.py`` checks it against the recipe."""
    meta = tomllib.loads((pkg.path / "pyproject.toml").read_text())
    return int(meta.get("tool", {}).get("medsynth", {}).get("demo_threads", 2))


def schedule(needs: list[int], cores: int) -> list[list[int]]:
    """In-order waves: consecutive demos start together while their threads fit in ``cores`` (two 1-thread
    demos share a 2-core machine, one thread per core; a demo never waits for a later one)."""
    waves: list[list[int]] = []
    for i, need in enumerate(needs):
        if waves and sum(needs[j] for j in waves[-1]) + need <= cores:
            waves[-1].append(i)
        else:
            waves.append([i])
    return waves


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", help="package to run (repeatable); default: all")
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="output root (default: runs/demo)")
    ap.add_argument("--cores", type=int, default=available_cores(),
                    help="CPU cores to fill: demos whose threads fit run side by side, each writing "
                         "<out>/<package>/demo.log (default: the cores this process may use; 1 = one at a time)")
    args = ap.parse_args(argv)
    if args.cores < 1:
        ap.error(f"--cores must be >= 1, got {args.cores}")

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    pkgs = select(args.package)
    needs = [min(demo_threads(p), args.cores) for p in pkgs]
    results = {}
    t_all = time.perf_counter()
    for wave in schedule(needs, args.cores):
        running = []
        for i in wave:
            pkg = pkgs[i]
            out = Path(args.out) / pkg.name
            cmd = [sys.executable, "-m", f"{pkg.import_name}.cli", "demo", "--out", str(out)]
            if len(wave) == 1:  # alone: its progress bars on this terminal
                print(f"== {pkg.name}: demo -> {out}", flush=True)
                log = None
                proc = subprocess.Popen(cmd, env=env)
            else:
                out.mkdir(parents=True, exist_ok=True)
                log = out / "demo.log"
                print(f"== {pkg.name}: demo -> {out} ({needs[i]} thread(s), side by side; log {log})", flush=True)
                with open(log, "wb") as fh:
                    proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            running.append((pkg, out, log, proc, time.perf_counter()))
        for pkg, out, log, proc, t0 in running:
            rc = proc.wait()
            seconds = time.perf_counter() - t0
            results[pkg.name] = finish(pkg, out, rc, seconds)
            if log is not None:
                print(f"   {pkg.name}: exit {rc} after {seconds:.0f} s", flush=True)
                if rc != 0:
                    tail = log.read_bytes()[-2000:].decode(errors="replace").replace("\r", "\n")
                    print("\n".join("   | " + ln for ln in tail.splitlines()[-15:]), flush=True)
    total = time.perf_counter() - t_all
    print("\nsummary:")
    for name, r in results.items():
        status = "ok" if r["ok"] else f"FAILED (exit {r['exit_code']})"
        print(f"  {name:16s} {status:22s} {r['seconds']:7.1f} s  {r['out']}")
        for line in r["heldout"]:
            print(f"      {line}")
    print(f"  all: {total:.1f} s on {args.cores} core(s)")
    print(json.dumps(results, indent=1) if os.environ.get("DEMO_JSON") else "", end="")
    return 0 if all(r["ok"] for r in results.values()) else 1


def finish(pkg: MethodPackage, out: Path, rc: int, seconds: float) -> dict:
    # figure.png, or one figure per stage (meddiffusion3d: figure_ae.png, figure_generate.png, ...)
    missing = [] if any(out.glob("figure*.png")) else ["figure*.png"]
    missing += [] if (out / "metrics.json").is_file() else ["metrics.json"]
    heldout = []
    if (out / "metrics.json").is_file():
        try:
            heldout = heldout_lines(json.loads((out / "metrics.json").read_text()))
        except (ValueError, TypeError) as exc:
            heldout = [f"metrics.json unreadable ({exc})"]
    if rc == 0 and missing:
        print(f"   {pkg.name}: demo exited 0 but did not write {missing}", flush=True)
    return {"ok": rc == 0 and not missing, "exit_code": rc, "seconds": round(seconds, 1), "out": str(out),
            "heldout": heldout}


if __name__ == "__main__":
    sys.exit(main())

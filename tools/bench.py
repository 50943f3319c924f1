"""Benchmark every method package: train-step time, samples/s, peak memory, inference latency.

Each package registers its cases in ``<import_name>/bench.py`` (``cases(config) -> list[BenchCase]``);
this script runs the ``demo`` configs, and the ``paper`` configs too with ``--paper`` (heavy).

    uv run tools/bench.py                       # demo configs, all packages, CPU
    uv run tools/bench.py --paper --device cuda --package meddiffusion3d
    uv run tools/bench.py --compare 95a0579 --package drdm --threads 2   # this tree vs that revision

``--compare REV`` measures every case of the current tree and the case of the same name at REV (a git
worktree under ``runs/bench/``), each measurement in a fresh process (``tools/bench_child.py``) against
that tree's code, ``--repeats`` processes per side interleaved (ours, base, base, ours, ...), each a
warm-up then the median of ``--inner-repeats`` iterations; it prints the median time, the peak RSS and the
ratio base/ours (> 1: this tree is faster) and writes them as JSON with the CPU, torch and threads.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import subprocess
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


METRICS = ("train_step_s", "infer_latency_s")


def worktree(rev: str, under: Path) -> tuple[Path, str]:
    """A detached git worktree of ``rev`` in ``under`` (made once, reused), and the full commit."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"--compare {rev}: not a commit of this repository ({exc.stderr.strip()})") from exc
    path = Path(under) / f"tree-{sha[:12]}"
    if not (path / ".git").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha],
                       capture_output=True, text=True, check=True)  # fmt: skip
    return path, sha


def child(tree: Path, package: str, config: str, extra: list[str], timeout: float = 3600) -> dict:
    """Run ``tools/bench_child.py`` in a fresh process against ``tree``; its ``BENCH_RESULT`` JSON."""
    cmd = [sys.executable, str(ROOT / "tools" / "bench_child.py"), "--tree", str(tree), "--package", package,
           "--config", config, *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no result"])[-1]}
    return json.loads(line[len("BENCH_RESULT "):])


def compare(args: argparse.Namespace, configs: list[str]) -> dict:
    """Every case of this tree vs the same-named case at ``args.compare`` (see the module docstring)."""
    base, sha = worktree(args.compare, Path(args.trees))
    opts = ["--device", args.device, "--threads", str(args.threads or 0), "--warmup", str(args.warmup),
            "--repeats", str(args.inner_repeats), "--channels-last", args.channels_last]  # fmt: skip
    rows = []
    for pkg in select(args.package):
        for config in configs:
            names = child(ROOT, pkg.import_name, config, ["--list"]).get("cases", [])
            base_names = set(child(base, pkg.import_name, config, ["--list"]).get("cases", []))
            for name in names:
                if args.case and not any(c in name for c in args.case):
                    continue
                row: dict = {"package": pkg.name, "config": config, "case": name}
                if name not in base_names:
                    rows.append({**row, "note": f"no case of that name at {args.compare}"})
                    print(f"{pkg.name} [{config}] {name}: not at {args.compare}", flush=True)
                    continue
                runs: dict[str, list[dict]] = {"ours": [], "base": []}
                for r in range(args.repeats):  # interleaved, the order alternating, a fresh process each
                    for side in ("ours", "base") if r % 2 == 0 else ("base", "ours"):
                        tree = ROOT if side == "ours" else base
                        runs[side].append(child(tree, pkg.import_name, config, ["--case", name, *opts]))
                errors = [x["error"] for side in runs.values() for x in side if "error" in x]
                if errors:
                    rows.append({**row, "error": errors[0]})
                    print(f"{pkg.name} [{config}] {name}: error: {errors[0]}", flush=True)
                    continue
                for metric in METRICS:
                    if metric not in runs["ours"][0] or metric not in runs["base"][0]:
                        continue
                    ours = statistics.median(x[metric] for x in runs["ours"])
                    theirs = statistics.median(x[metric] for x in runs["base"])
                    rss = {side: max(x["peak_rss_mb"] for x in v) for side, v in runs.items()}
                    rows.append({**row, "metric": metric, "ours_s": ours, "base_s": theirs, "ratio": theirs / ours,
                                 "ours_peak_rss_mb": rss["ours"], "base_peak_rss_mb": rss["base"],
                                 "processes": args.repeats, "inner_repeats": args.inner_repeats,
                                 "ours_module": runs["ours"][0]["module"], "base_module": runs["base"][0]["module"]})  # fmt: skip
                    print(f"{pkg.name} [{config}] {name} {metric}: ours {ours:.4g} s, {args.compare} {theirs:.4g} s, "
                          f"ratio {theirs / ours:.2f}x; peak RSS {rss['ours']:.0f} vs {rss['base']:.0f} MiB",
                          flush=True)  # fmt: skip
    return {"base": {"rev": args.compare, "commit": sha}, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", help="package to bench (repeatable); default: all")
    ap.add_argument("--paper", action="store_true", help="also bench the paper configs (heavy)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "report.json"))
    ap.add_argument("--compare", metavar="REV", default=None,
                    help="also measure each case at this git revision (fresh processes, interleaved) and report "
                         "the ratio revision/ours")  # fmt: skip
    ap.add_argument("--case", action="append", default=None,
                    help="with --compare: only cases whose name contains this (repeatable)")
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                    help="run.channels_last for this tree's cases (auto: CUDA only; a tree without the switch "
                         "ignores it)")  # fmt: skip
    ap.add_argument("--inner-repeats", type=int, default=3,
                    help="with --compare: timed iterations per process (their median; --repeats counts processes)")
    ap.add_argument("--trees", default=str(ROOT / "runs" / "bench"),
                    help="with --compare: folder of the git worktrees of compared revisions (default runs/bench)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import medsynth_core.bench

    medsynth_core.bench.CHANNELS_LAST = args.channels_last
    device = torch.device(args.device)
    report = {
        "machine": {"platform": platform.platform(), "processor": cpu_model(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "channels_last": args.channels_last,
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "packages": {},
    }
    configs = ["demo", "paper"] if args.paper else ["demo"]
    if args.compare:
        report["compare"] = compare(args, configs)
        atomic_write_text(args.out, json.dumps(report, indent=2))
        print(f"report: {args.out}")
        return 0
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

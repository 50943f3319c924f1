"""Run the ``demo`` verb of every method package (or those named with ``--package``).

Each demo trains its demo recipe on the embedded phantom data, checkpoints, resumes once, and scores
the trained model on held-out phantom subjects against named trivial baselines (``../shared/LEARNING.md``),
writing ``runs/demo/<package>/{figure.png, metrics.json, heldout/}``. The summary prints, per package
and task, ours vs the best baseline (PSNR in dB, from ``metrics.json``).

    uv run tools/demo.py                    # all packages
    uv run tools/demo.py --package drdm     # one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workspace import ROOT, select  # noqa: E402


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", help="package to run (repeatable); default: all")
    ap.add_argument("--out", default=str(ROOT / "runs" / "demo"), help="output root (default: runs/demo)")
    args = ap.parse_args(argv)

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    results = {}
    for pkg in select(args.package):
        out = Path(args.out) / pkg.name
        print(f"== {pkg.name}: demo -> {out}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"{pkg.import_name}.cli", "demo", "--out", str(out)], env=env)
        seconds = time.perf_counter() - t0
        # figure.png, or one figure per stage (meddiffusion3d: figure_ae.png, figure_generate.png, ...)
        missing = [] if any(out.glob("figure*.png")) else ["figure*.png"]
        missing += [] if (out / "metrics.json").is_file() else ["metrics.json"]
        ok = rc == 0 and not missing
        heldout = []
        if (out / "metrics.json").is_file():
            try:
                heldout = heldout_lines(json.loads((out / "metrics.json").read_text()))
            except (ValueError, TypeError) as exc:
                heldout = [f"metrics.json unreadable ({exc})"]
        results[pkg.name] = {"ok": ok, "exit_code": rc, "seconds": round(seconds, 1), "out": str(out),
                             "heldout": heldout}
        if rc == 0 and missing:
            print(f"   {pkg.name}: demo exited 0 but did not write {missing}", flush=True)
    print("\nsummary:")
    for name, r in results.items():
        status = "ok" if r["ok"] else f"FAILED (exit {r['exit_code']})"
        print(f"  {name:16s} {status:22s} {r['seconds']:7.1f} s  {r['out']}")
        for line in r["heldout"]:
            print(f"      {line}")
    print(json.dumps(results, indent=1) if os.environ.get("DEMO_JSON") else "", end="")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""One benchmark measurement in a fresh process, against the code of one source tree (``tools/bench.py
--compare`` runs it for the current tree and for a git worktree of the revision compared with).

    python tools/bench_child.py --tree DIR --package drdm --config demo --list
    python tools/bench_child.py --tree DIR --package drdm --config demo --case drdm-demo --threads 2

The tree's ``shared/core/src`` and ``packages/*/src`` go first on ``sys.path``, so ``medsynth_core`` and the
package (its ``bench.cases`` and the code they time) are that tree's, whatever the environment has installed.
The result is one line ``BENCH_RESULT {json}`` on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", required=True, help="source tree (repository root) whose code is measured")
    ap.add_argument("--package", required=True, help="import name of the package (drdm, fda_vae, ...)")
    ap.add_argument("--config", default="demo", help="demo | paper")
    ap.add_argument("--case", default=None, help="the case to measure (name as its bench.cases lists it)")
    ap.add_argument("--list", action="store_true", help="print the tree's case names for package and config")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed iterations (their median)")
    ap.add_argument("--channels-last", default="auto", help="run.channels_last for the tree's cases (if it has one)")
    args = ap.parse_args(argv)

    tree = Path(args.tree).resolve()
    sys.path[0:0] = [str(tree / "shared" / "core" / "src"), *map(str, sorted((tree / "packages").glob("*/src")))]
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        module = importlib.import_module(f"{args.package}.bench")
    except ModuleNotFoundError as exc:  # the package or its bench module does not exist in that tree
        print("BENCH_RESULT " + json.dumps({"missing": str(exc)}))
        return 0
    origin = Path(module.__file__).resolve()
    if tree not in origin.parents:
        raise SystemExit(f"{args.package}.bench was imported from {origin}, not from {tree}")
    cases = module.cases(args.config)
    if args.list:
        print("BENCH_RESULT " + json.dumps({"cases": [c.name for c in cases]}))
        return 0
    chosen = [c for c in cases if c.name == args.case]
    if not chosen:
        print("BENCH_RESULT " + json.dumps({"missing": f"no case {args.case!r} in {origin}"}))
        return 0
    import medsynth_core.bench as core_bench

    # a tree without the switch (older revisions) has no CHANNELS_LAST; its cases run as they always did
    layout = args.channels_last if hasattr(core_bench, "CHANNELS_LAST") else "n/a"
    core_bench.CHANNELS_LAST = args.channels_last
    result = core_bench.run_case(chosen[0], torch.device(args.device), warmup=args.warmup, repeats=args.repeats)
    result.update(threads=torch.get_num_threads(), torch=torch.__version__, module=str(origin), channels_last=layout)
    print("BENCH_RESULT " + json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The shared runners in tools/ (bench) report what they measure, or that nothing is registered."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_report_is_written(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--package", "drdm",
                           "--threads", "1", "--repeats", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["machine"]["torch"]
    entry = report["packages"]["drdm"]
    if "status" in entry:
        assert "not implemented" in entry["status"]
    else:
        for case in entry["demo"]:
            assert case["peak_rss_mb"] > 0
            assert case.get("train_step_s", 1) > 0 and case.get("infer_latency_s", 1) > 0


def test_unknown_package_is_rejected():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--package", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown package" in proc.stderr


def test_demo_summary_lines_name_ours_and_best_baseline():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    one = {"heldout": {"cases": 4, "metric": "psnr_db", "method": 27.4,
                       "baselines": {"copy_source": 21.0, "oracle_linear": 25.5}}}
    assert demo.heldout_lines(one) == [
        "heldout: ours 27.40 dB vs best baseline oracle_linear 25.50 dB (+1.90) over 4 cases"]
    many = {"heldout": {"sr": {"cases": 2, "method": 20.0, "baselines": {"trilinear": 21.0}},
                        "cms": {"cases": 2, "method": 18.0, "baselines": {"copy_source": 12.0}}}}
    lines = demo.heldout_lines(many)
    assert lines[0].startswith("sr: ours 20.00 dB") and "(-1.00)" in lines[0]
    assert lines[1].startswith("cms: ") and "(+6.00)" in lines[1]
    assert demo.heldout_lines({"train": {}}) == ["no held-out block in metrics.json"]


def _tools_demo():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import demo
    finally:
        sys.path.pop(0)
    return demo


def test_demo_schedule_pairs_one_thread_demos_in_order():
    demo = _tools_demo()
    assert demo.schedule([1, 1, 2, 2, 2], cores=2) == [[0, 1], [2], [3], [4]]
    assert demo.schedule([1, 1, 2, 2, 2], cores=1) == [[0], [1], [2], [3], [4]]
    assert demo.schedule([1, 2, 1, 1, 1], cores=2) == [[0], [1], [2, 3], [4]]  # never reorders
    assert demo.schedule([1, 1, 2, 2, 2], cores=6) == [[0, 1, 2, 3], [4]]


def test_declared_demo_threads_match_the_recipes():
    """tools/demo.py runs demos side by side from ``demo_threads``: it must be the threads the recipe uses."""
    from drdm.demo import demo_config as drdm_demo
    from fda_vae.demo import demo_config as fda_demo
    from meddiffusion3d.learn import learn_config
    from uni_coal.demo import RECIPE

    demo = _tools_demo()
    declared = {p.name: demo.demo_threads(p) for p in demo.select(None)}
    cfg = learn_config()
    actual = {
        "drdm": drdm_demo().run.threads,
        "fda-vae": fda_demo().run.threads,
        "meddiffusion3d": cfg.run.threads,
        "mgdcr": 2,  # sets no threads: the OMP_NUM_THREADS=2 tools/demo.py gives it
        "uni-coal": int(next(o for o in RECIPE if o.startswith("run.threads=")).split("=")[1]),
    }
    assert declared == actual


def test_bench_compare_measures_both_trees(tmp_path):
    """Issue 19: ``--compare REV`` times each case in fresh processes against this tree and against a git
    worktree of REV (its own code), interleaved, and reports both times, peak RSS and the ratio."""
    import os

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        import pytest

        pytest.skip("not a git checkout")
    out = tmp_path / "cmp.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--compare", "HEAD", "--package", "drdm",
           "--case", "drdm-demo", "--threads", "1", "--repeats", "2", "--inner-repeats", "1",
           "--trees", str(tmp_path / "trees"), "--out", str(out)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        rep = json.loads(out.read_text())["compare"]
        assert rep["base"]["commit"] == head.stdout.strip()
        rows = [r for r in rep["rows"] if "metric" in r]
        assert {r["metric"] for r in rows} == {"train_step_s", "infer_latency_s"}, rep
        for r in rows:
            assert r["ours_s"] > 0 and r["base_s"] > 0 and abs(r["ratio"] - r["base_s"] / r["ours_s"]) < 1e-9
            assert r["base_module"].startswith(str(tmp_path / "trees")) and r["ours_module"].startswith(str(ROOT))
            assert r["ours_peak_rss_mb"] > 0 and r["base_peak_rss_mb"] > 0 and r["processes"] == 2
        assert "ratio" in proc.stdout
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", *map(str, (tmp_path / "trees").glob("tree-*"))],
                       capture_output=True)  # fmt: skip
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)

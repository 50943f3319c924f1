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

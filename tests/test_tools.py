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

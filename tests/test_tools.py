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

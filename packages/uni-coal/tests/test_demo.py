"""The demo code path in seconds (the full recipe runs in test_learns.py)."""

from __future__ import annotations

import json

import pytest


def test_demo_micro(tmp_path):
    """The demo code path in seconds (2 steps, one held-out case): files, blocks, resume."""
    from medsynth_core.heldout import rescore
    from uni_coal.demo import run_demo

    res = run_demo(tmp_path, steps=2, heldout_cases=1)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert set(m["heldout"]) == {"sr", "cms", "cmsr"} and m["train"]["resumed_at"] == 1
    assert set(m["heldout"]["sr"]["baselines"]) == {"trilinear", "nearest"}
    assert set(m["heldout"]["cms"]["baselines"]) == {"copy_source", "oracle_linear"}
    assert set(m["heldout"]["cmsr"]["baselines"]) == {"trilinear_source", "oracle_linear_trilinear"}
    assert all(0 < b["method"] < 100 for b in m["heldout"].values())
    assert rescore(tmp_path / "heldout")["cms"]["method"] == pytest.approx(res["cms"]["ours"], abs=1e-4)
    assert (tmp_path / "figure.png").stat().st_size > 1000

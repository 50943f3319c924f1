"""Shown to learn (issue 12, ``../shared/LEARNING.md``): the demo recipe, trained from scratch, beats the
trivial answers on held-out phantom subjects in both directions (deterministic decode).

One ``run_demo`` with the demo config and seeds (the function ``fda-vae demo`` calls), about 5 minutes on
one CPU thread; every figure of its ``metrics.json`` is recomputed from the NIfTI files it wrote.
"""

from __future__ import annotations

import json
import math

import pytest

from fda_vae.demo import HELDOUT_CASES, MARGINS, demo_config, run_demo
from medsynth_core.heldout import check_margins, rescore


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("fda_demo")
    res = run_demo(out)
    return out, res, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("task", ["a_to_b", "b_to_a"])
def test_beats_copy_and_oracle_linear(demo, task):
    """ours >= copy_source + 2 dB and >= oracle_linear (per-case least squares a*source+b) + 0.5 dB."""
    _, _, m = demo
    block = m["heldout"][task]
    assert block["cases"] == HELDOUT_CASES and block["metric"] == "psnr_db"
    assert check_margins(block, MARGINS) == []
    # the phantom is not trivial: copying the source phase is far from the target, a global linear map too
    assert block["baselines"]["copy_source"] < 29.0 and block["baselines"]["oracle_linear"] < 31.0
    assert block["ssim"]["method"] > block["ssim"]["baselines"]["oracle_linear"]
    # the sampled decode (−μ + σε) is reported beside the deterministic one
    assert math.isfinite(block["sampled"]["psnr_db"]) and block["sampled"]["psnr_db"] > 20.0


def test_json_agrees_with_the_nifti_files(demo):
    out, _, m = demo
    again = rescore(out / "heldout")
    assert set(again) == {"a_to_b", "b_to_a"}
    for task, block in again.items():
        assert block["method"] == pytest.approx(m["heldout"][task]["method"], abs=1e-4)
        for name, value in block["baselines"].items():
            assert value == pytest.approx(m["heldout"][task]["baselines"][name], abs=1e-4)
    case = out / "heldout" / "a_to_b" / "case00"
    names = {p.name for p in case.iterdir()}
    assert names == {
        "input_arterial.nii.gz", "baseline_copy_source.nii.gz", "baseline_oracle_linear.nii.gz",
        "pred.nii.gz", "target.nii.gz",
    }


def test_recipe_and_files(demo):
    out, res, m = demo
    cfg = demo_config()
    assert m["train"]["steps"] == cfg.train.steps and m["train"]["resumed_at"] == cfg.train.steps // 2
    assert m["train"]["seconds"] < 8 * 60  # LEARNING.md budget
    assert m["losses_on"]["w_adv"] > 0 and m["losses_on"]["w_fda"] > 0 and m["losses_on"]["w_perc"] == 0
    assert m["subjects"]["heldout"][0] not in (m["subjects"]["train"][0], m["subjects"]["validation"][0])
    assert (out / "figure.png").stat().st_size > 1000
    assert res["a_to_b"]["ours"] == pytest.approx(m["heldout"]["a_to_b"]["method"])

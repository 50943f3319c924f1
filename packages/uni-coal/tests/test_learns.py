"""Shown to learn (issue 15, ``../shared/LEARNING.md``): ONE co-modulated generator, trained from scratch by
the demo recipe (the task mix of the evaluated pairs: T2 target, T1/T2 source; adversarial + L1 + R1,
EMA), beats the trivial answers on held-out phantom subjects for SR, CMS and CMSR.

One ``run_demo`` with the demo config and seeds (the function ``uni-coal demo`` calls); every figure of its
``metrics.json`` is recomputed from the NIfTI files it wrote.
"""

from __future__ import annotations

import json

import pytest

from medsynth_core.heldout import check_margins, rescore
from uni_coal.demo import HELDOUT_CASES, HELDOUT_SEED, MARGINS, SR_THICKNESS, TASKS, demo_config, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("unicoal_demo")
    res = run_demo(out)
    return out, res, json.loads((out / "metrics.json").read_text())


# Margins the recipe does not reach yet: strict expected failures with the numbers measured (an XPASS fails
# the run, so a fix must remove the entry). The threshold itself is never lowered. None since the demo recipe
# trains the evaluated pairs (T2 target, T1/T2 source): SR 19.44 vs trilinear 18.53 on the recorded seed.
NOT_YET: dict[tuple[str, str], str] = {}

MARGIN_CASES = [
    pytest.param(
        task,
        base,
        marks=[pytest.mark.xfail(strict=True, reason=NOT_YET[(task, base)])]
        if (task, base) in NOT_YET
        else [],
        id=f"{task}-{base}",
    )
    for task, margins in MARGINS.items()
    for base in margins
]


@pytest.mark.parametrize(("task", "baseline"), MARGIN_CASES)
def test_beats_baseline_by_its_margin(demo, task, baseline):
    """sr: >= trilinear + 0.5, >= nearest + 2; cms: >= oracle_linear + 1, >= copy_source + 2;
    cmsr: >= oracle_linear on the trilinear-upsampled source + 1 (dB, held-out mean PSNR)."""
    _, _, m = demo
    block = m["heldout"][task]
    assert block["cases"] == HELDOUT_CASES and block["metric"] == "psnr_db"
    assert (block["source"], block["target"], block["thickness"]) == tuple(TASKS[task])
    assert check_margins(block, {baseline: MARGINS[task][baseline]}) == []


def test_phantom_is_not_trivial(demo):
    """The modalities differ non-linearly per tissue (CSF dark in T1, bright in T2): no global linear map
    of T1 reaches T2, and copying is far off; interpolation does not solve the thick-slice gap."""
    _, _, m = demo
    cms, sr = m["heldout"]["cms"]["baselines"], m["heldout"]["sr"]["baselines"]
    assert cms["oracle_linear"] < 20.0 and cms["copy_source"] < 20.0
    assert sr["trilinear"] < 25.0


def test_json_agrees_with_the_nifti_files(demo):
    out, _, m = demo
    again = rescore(out / "heldout")
    assert set(again) == {"sr", "cms", "cmsr"}
    for task, block in again.items():
        assert block["method"] == pytest.approx(m["heldout"][task]["method"], abs=1e-4)
        assert set(block["baselines"]) == set(m["heldout"][task]["baselines"])
        for name, value in block["baselines"].items():
            assert value == pytest.approx(m["heldout"][task]["baselines"][name], abs=1e-4)
    names = {p.name for p in (out / "heldout" / "sr" / "case00").iterdir()}
    assert names == {
        "input_T2_t2.nii.gz",
        "baseline_trilinear.nii.gz",
        "baseline_nearest.nii.gz",
        "pred.nii.gz",
        "target.nii.gz",
    }


def test_recipe_and_files(demo):
    out, res, m = demo
    cfg = demo_config()
    assert m["train"]["steps"] == cfg.train.steps and m["train"]["resumed_at"] == cfg.train.steps // 2
    assert m["train"]["seconds"] + m["eval_seconds"] < 8 * 60  # LEARNING.md budget (2 cores; here 1 thread)
    # the paper's losses: adversarial, L1, R1 (SAM off: no SAM weights in the demo)
    assert (
        m["losses_on"]["adversarial"] and m["losses_on"]["lambda_l1"] > 0 and m["losses_on"]["lambda_r1"] > 0
    )
    # one network for the three tasks: the recipe draws SR (T2 -> T2, t > 1), CMS (T1 -> T2, t = 1) and CMSR
    d = cfg.data
    assert d.fixed_target == "T2" and set(d.sources) == {"T1", "T2"} and d.fixed_source is None
    assert 1 in d.thicknesses and SR_THICKNESS in d.thicknesses
    assert m["subjects"]["heldout_seeds"][0] == HELDOUT_SEED > m["subjects"]["train_seeds"][1]
    for name in ("figure.png", "figure_sr.png", "figure_cms.png", "figure_cmsr.png"):
        assert (out / name).stat().st_size > 1000
    assert res["cms"]["ours"] == pytest.approx(m["heldout"]["cms"]["method"])

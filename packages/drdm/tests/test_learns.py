"""Shown to learn (issue 13, ``../shared/LEARNING.md``): the demo recipe, trained from scratch, on held-out
phantoms.

One ``run_demo`` with the demo config and seeds (the function ``drdm demo`` calls), about 3 minutes on one
CPU thread (5 with the downstream protocol); every figure of its ``metrics.json`` is recomputed from the NIfTI files it wrote.

The issue's margins (cosine >= 0.6 and EPE <= 0.6 x zero field at t = 10, 20, 40; fold <= 1 % with Psi_rand of
the same magnitude folding more) are asserted as written, but the recipe does not reach them (README, "Shown
to learn"): they are strict expected failures, so a recipe that meets them turns the run red until the marks
are removed. What the recipe does reach (clearly better than the zero field, on every seed tried) is asserted
beside them.
"""

from __future__ import annotations

import json

import pytest

from drdm.demo import HELDOUT_CASES, LEVELS, MARGINS, demo_config, rescore_augment, rescore_fields, run_demo
from drdm.downstream import SegSettings, run_downstream
from drdm.infer import load_network
from medsynth_core.checkpoint import CheckpointManager
from medsynth_core.heldout import rescore

NOT_MET = (
    "issue 13 margin not reached by the CPU recipe (textured phantoms, C = 8, rec_num 1, 1500 steps, weight EMA "
    "0.99; 8 held-out phantoms, training seeds 0 / 1 / 2: cosine at t = 10 0.62 / 0.59 / 0.59, EPE 0.70-0.74 / "
    "0.62-0.67 / 0.70-0.71 x zero field at t = 10 / 20 / 40; phi folds 0.01-0.10 % at max 15-17 % of S, but "
    "Psi_rand of the same maximum folds 0.0 %); the official CMR weights on held-out ACDC slices score 0.55 / "
    "0.78 x at t = 10 themselves (README)"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("drdm_demo")
    res = run_demo(out)
    return out, res, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def downstream(demo):
    """Issue 13's Table 2 protocol in small with the model the demo just trained (no second training):
    MONAI U-Net on k in {2, 5} labelled phantoms, arms no_aug / bigaug / drdm, seeds 0-2, 300 steps each
    (``drdm downstream``'s defaults), scored on 16 held-out phantoms. About 3.5 minutes on one thread."""
    out = demo[0]
    net, cfg = load_network(CheckpointManager(out / "runs" / "drdm" / "demo" / "checkpoints").latest())
    st = SegSettings()
    res = run_downstream(net, cfg, out / "downstream", st)
    return out / "downstream", st, res


def test_downstream_drdm_beats_no_augmentation(downstream):
    """Issue 13: the U-Net trained with DRDM augmentation scores a mean Dice >= no augmentation + 0.02 at
    k = 2 (mean over 3 seeds on the held-out phantoms); every arm is reported."""
    _, st, res = downstream
    s = res["summary"]
    report = {
        arm: {k: (round(v["dsc_mean"]["mean"], 3), round(v["dsc_mean"]["std"], 3)) for k, v in per_k.items()}
        for arm, per_k in s.items()
    }
    print("downstream mean Dice (mean, std over seeds):", report)
    assert s["drdm"]["2"]["dsc_mean"]["mean"] >= s["no_aug"]["2"]["dsc_mean"]["mean"] + 0.02, report


def test_downstream_files_and_protocol(downstream):
    out, st, res = downstream
    m = json.loads((out / "downstream.json").read_text())
    assert set(m["summary"]) == {"no_aug", "bigaug", "drdm"} and m["n_test"] == st.n_test
    for per_k in m["summary"].values():
        assert set(per_k) == {"2", "5"}
        for blk in per_k.values():
            assert len(blk["dsc_mean"]["per_seed"]) == 3
            for key in ("dsc", "sensitivity", "precision"):
                assert all(f"{key}_{c}" in blk for c in (1, 2, 3))
    assert (out / "cases.csv").stat().st_size > 0 and (out / "figure.png").stat().st_size > 1000
    assert len(res["rows"]) == 3 * 2 * 3 * st.n_test
    assert m["seconds"] < 5 * 60  # the test's extra time (issue 13: about 4 minutes)


@pytest.mark.xfail(strict=True, reason=NOT_MET)
def test_recovery_margins(demo):
    """Issue 13: at t in {10, 20, 40}, mean cosine(psi_hat, psi*) >= 0.6 and EPE <= 0.6 x the zero field's."""
    _, _, m = demo
    for t in LEVELS:
        lv = m["heldout"]["recovery"]["fields"][f"t{t}"]
        assert lv["cosine"] >= MARGINS["cosine_min"], (t, lv)
        assert lv["epe_px"] <= MARGINS["epe_ratio_max"] * lv["epe_zero_px"], (t, lv)


def test_recovery_beats_zero_field(demo):
    """What the recipe reaches on held-out phantoms (8; training seeds 0-2: cosine 0.59-0.62 / 0.70-0.74 /
    0.70-0.72, EPE 0.70-0.74 / 0.62-0.67 / 0.70-0.71 x at t = 10 / 20 / 40): the predicted recovery points the
    right way at every t (zero field: cosine 0), ends closer to psi* than no recovery, and recovers the images
    better."""
    _, _, m = demo
    block = m["heldout"]["recovery"]
    assert block["cases"] == HELDOUT_CASES * len(LEVELS) and block["levels"] == list(LEVELS)
    for t in LEVELS:
        lv = block["fields"][f"t{t}"]
        assert lv["epe_zero_px"] > 0.05  # there is something to recover
        assert lv["cosine"] >= {10: 0.55, 20: 0.65, 40: 0.65}[t], (t, lv)
        assert lv["epe_ratio"] < 0.78, (t, lv)
    assert block["method"] > block["baselines"]["zero_field"] + 2.0  # PSNR of W(I_t, .) against W(I_t, psi*)


@pytest.mark.xfail(strict=True, reason=NOT_MET)
def test_augmentation_margins(demo):
    """Issue 13: DRDM samples fold on <= 1 % of pixels; Psi_rand of the same maximum magnitude folds more."""
    aug = demo[2]["augment"]
    assert aug["phi"]["fold"] <= MARGINS["fold_max"], aug["phi"]
    assert aug["psi_rand_matched"]["fold"] > aug["phi"]["fold"], aug


def test_augmentation_magnitude(demo):
    """DRDM samples reach max |S phi| >= 10 % of S (issue 13); the matched Psi_rand has phi's maximum."""
    aug = demo[2]["augment"]
    assert aug["phi"]["mag_max_pct"] >= MARGINS["mag_max_pct_min"], aug["phi"]
    assert aug["phi"]["mag_mean_px"] < aug["psi_rand"]["mag_mean_px"]  # recovery shrinks Psi_rand(T')
    assert aug["psi_rand_matched"]["mag_max_px"] == pytest.approx(aug["phi"]["mag_max_px"], rel=1e-4)


def test_json_agrees_with_the_nifti_files(demo):
    out, _, m = demo
    block = m["heldout"]["recovery"]
    again = rescore(out / "heldout")
    assert set(again) == {"recovery"}
    assert again["recovery"]["method"] == pytest.approx(block["method"], abs=1e-4)
    assert again["recovery"]["baselines"]["zero_field"] == pytest.approx(
        block["baselines"]["zero_field"], abs=1e-4
    )
    fields = rescore_fields(out / "heldout" / "recovery")
    assert len(fields) == block["cases"]
    for case, sc in fields.items():
        ours = block["per_case"][case]["metrics"]
        assert sc["pred"]["cosine"] == pytest.approx(ours["cosine"], abs=1e-4)
        assert sc["pred"]["epe_px"] == pytest.approx(ours["epe_px"], abs=1e-4)
        assert sc["zero_field"]["epe_px"] == pytest.approx(ours["epe_zero_px"], abs=1e-4)
        assert sc["zero_field"]["cosine"] == 0.0
    for t in LEVELS:
        cases = [c for c in fields if c.endswith(f"_t{t:02d}")]
        mean_cos = sum(fields[c]["pred"]["cosine"] for c in cases) / len(cases)
        assert mean_cos == pytest.approx(block["fields"][f"t{t}"]["cosine"], abs=1e-4)
    names = {p.name for p in (out / "heldout" / "recovery" / "case00_t10").iterdir()}
    assert names == {
        "input_image.nii.gz",
        "target.nii.gz",
        "pred.nii.gz",
        "baseline_zero_field.nii.gz",
        "field_target.nii.gz",
        "field_pred.nii.gz",
        "field_baseline_zero_field.nii.gz",
    }
    aug = rescore_augment(out / "augment", demo_config().diffusion.img_size)
    for kind in ("phi", "psi_rand"):
        for key in ("fold", "mag_max_pct", "mag_mean_px"):
            assert aug[f"{kind}.{key}"] == pytest.approx(m["augment"][kind][key], abs=1e-4)


def test_recipe_and_files(demo):
    out, _, m = demo
    cfg = demo_config()
    assert m["train"]["steps"] == cfg.train.steps and m["train"]["resumed_at"] == cfg.train.steps // 2
    assert m["train"]["seconds"] < 8 * 60  # LEARNING.md budget (2 CPU cores)
    assert (out / "figure.png").stat().st_size > 1000
    assert all(r["lab_fold"] == 0.0 for r in m["forward_levels"])

"""Shown to learn (issue 16, ``../shared/LEARNING.md``): the recipe of ``configs/learn.yaml``, trained from
scratch by :func:`meddiffusion3d.learn.run_learning` (what ``meddiffusion3d demo`` calls, same config and seeds),
beats the trivial answers on held-out phantom subjects in all three stages; every figure of its
``metrics.json`` is recomputed from the NIfTI files it wrote.
"""

from __future__ import annotations

import json

import pytest

from meddiffusion3d.learn import (
    CLASSIFIER_MIN,
    HELDOUT_CASES,
    MARGINS,
    N_PER_CLASS,
    TASKS,
    learn_config,
    run_learning,
)
from medsynth_core.heldout import check_margins, rescore


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    out = tmp_path_factory.mktemp("md3d_learn")
    run_learning(out)
    return out, json.loads((out / "metrics.json").read_text())


def test_ae_beats_avgpool_trilinear(learned):
    """ours >= avgpool_trilinear (average-pool by the compression factor, trilinear back) + 2 dB."""
    _, m = learned
    block = m["heldout"]["ae"]
    assert block["cases"] == HELDOUT_CASES and block["compression_factor"] == learn_config().ae.downsample
    assert check_margins(block, MARGINS["ae"]) == []
    assert block["ssim"]["method"] > block["ssim"]["baselines"]["avgpool_trilinear"]
    cb = block["codebook"]
    assert cb["heldout_perplexity"] > 16 and cb["heldout_codes_used"] <= cb["n_codes"]


@pytest.mark.parametrize("task", TASKS)
def test_controlnet_restores(learned, task):
    """restored >= degraded + 1 dB and >= the AE reconstruction of the degraded input, over the held-out set."""
    _, m = learned
    block = m["heldout"][f"controlnet_{task}"]
    assert block["cases"] == HELDOUT_CASES
    assert check_margins(block, MARGINS["controlnet"]) == []


def test_generation_is_class_faithful(learned):
    _, m = learned
    g = m["heldout"]["generate"]
    n_cls = learn_config().biflownet.classes
    assert g["samples_per_class"] == N_PER_CLASS >= 8 and g["cases"] == N_PER_CLASS * n_cls
    assert g["classifier_accuracy"]["method"] >= CLASSIFIER_MIN
    assert g["classifier_accuracy"]["random_latent"] < CLASSIFIER_MIN


def test_generation_fid_mmd_below_random_latents(learned):
    """FID and MMD of the samples against the real held-out set are below those of ``random_latent``. The
    features are MedicalNet's ResNet-50 with random weights (seed 0: nothing is downloaded and the demo takes
    no weights file), so this shows closeness in one fixed feature space, not the paper's FID/MMD values."""
    _, m = learned
    g = m["heldout"]["generate"]
    assert g["fid"]["method"] < g["fid"]["random_latent"]
    assert g["mmd"]["method"] < g["mmd"]["random_latent"]


def test_json_agrees_with_the_nifti_files(learned):
    out, m = learned
    again = rescore(out / "heldout")
    assert set(again) == {"ae", "generate", *(f"controlnet_{t}" for t in TASKS)}
    for task, block in again.items():
        assert block["method"] == pytest.approx(m["heldout"][task]["method"], abs=1e-4)
        for name, value in block["baselines"].items():
            assert value == pytest.approx(m["heldout"][task]["baselines"][name], abs=1e-4)
    names = {p.name for p in (out / "heldout" / "ae" / "case00").iterdir()}
    assert names == {"baseline_avgpool_trilinear.nii.gz", "pred.nii.gz", "target.nii.gz"}


def test_recipe_and_figures(learned):
    out, m = learned
    t = m["train"]
    cfg = learn_config()
    assert t["ae"]["stage1_steps"] == cfg.ae.stage1.steps and t["biflownet"]["steps"] == cfg.train.steps
    for stage in ("ae", "generate", "controlnet"):
        assert (out / f"figure_{stage}.png").stat().st_size > 1000
    # the ControlNet ceiling: the AE's reconstruction of the clean ControlNet targets is reported per case;
    # they are the AE stage's held-out cases, so its mean is the AE block's PSNR
    for task in TASKS:
        ceiling = m["heldout"][f"controlnet_{task}"]["ae_of_target_psnr_db"]
        assert len(ceiling["per_case"]) == HELDOUT_CASES
        assert ceiling["mean"] == pytest.approx(m["heldout"]["ae"]["method"], abs=0.01)


def test_three_stages_within_budget(learned):
    _, m = learned
    assert m["train"]["seconds"] < 12 * 60  # LEARNING.md: three stages <= 12 minutes

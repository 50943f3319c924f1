"""Shown to learn (issue 14, spec §7-E4, ``../shared/LEARNING.md``): the demo recipe, trained from scratch,
reconstructs held-out phantom subjects better than z-linear interpolation and than the decoded DiffAE seeds.

One ``run_demo`` with the demo config and seeds (the function ``mgdcr demo`` calls): the micro prior trained
1000 steps, then the LAX-guided inverse problem on three phantoms the training never saw; about 4 minutes on
one CPU thread. Scored on the non-acquired dense slices; every figure of ``metrics.json`` is recomputed
from the NIfTI files it wrote.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from medsynth_core.heldout import check_margins, rescore
from mgdcr.demo import MARGINS, PER_SLICE_MARGIN, demo_case, demo_config, heldout_slices, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("mgdcr_demo")
    res = run_demo(out)
    return out, res, json.loads((out / "metrics.json").read_text())


def test_beats_z_linear_and_the_seeds(demo):
    """Volume PSNR over the held-out dense slices: ours >= z-linear + 1 dB and >= seeds + 0.5 dB; the mean
    per-slice PSNR >= z-linear's + 0.5 dB; blood-pool Dice >= z-linear's (case means)."""
    _, _, m = demo
    block = m["heldout"]
    cfg, _ = demo_config()
    assert block["cases"] == len(cfg.demo.heldout_seeds) and block["metric"] == "psnr_db"
    assert check_margins(block, MARGINS) == [], block["baselines"] | {"ours": block["method"]}
    ps = block["psnr_slice_mean_db"]
    assert ps["method"] >= ps["baselines"]["z_linear"] + PER_SLICE_MARGIN, ps
    dice = block["bloodpool_dice"]
    assert dice["method"] >= dice["baselines"]["z_linear"], dice
    # the phantom is not trivial: z-linear cross-fades the anatomy that changes over the 8 mm gaps
    assert block["baselines"]["z_linear"] < 28.5 and ps["baselines"]["z_linear"] < 30.5


def test_json_agrees_with_the_nifti_files(demo):
    out, _, m = demo
    again = rescore(out / "heldout")
    block = m["heldout"]
    assert again["cases"] == block["cases"]
    assert again["method"] == pytest.approx(block["method"], abs=1e-4)
    for name, value in again["baselines"].items():
        assert value == pytest.approx(block["baselines"][name], abs=1e-4)
    for case, entry in again["per_case"].items():
        assert entry["method"]["psnr_db"] == pytest.approx(
            block["per_case"][case]["method"]["psnr_db"], abs=1e-4
        )


def test_files_and_geometry(demo):
    """Inputs with their real affines (the SAX stack and the LAX planes overlay the dense volume in world
    space), the scored held-out slices, the dense volumes on the dense grid, the figure."""
    out, res, m = demo
    cfg, _ = demo_config()
    seed = cfg.demo.heldout_seeds[0]
    case = out / "heldout" / f"seed{seed:03d}"
    names = {p.name for p in case.iterdir()}
    assert names == {
        "input_sax.nii.gz",
        "input_lax_2ch.nii.gz",
        "input_lax_3ch.nii.gz",
        "input_lax_4ch.nii.gz",
        "baseline_z_linear.nii.gz",
        "baseline_seeds.nii.gz",
        "pred.nii.gz",
        "target.nii.gz",
    }
    c = demo_case(cfg, seed)
    D, K = c["grid"].D, cfg.inverse.K
    held = heldout_slices(D, K)
    assert m["heldout_slices"] == held and len(held) == D - cfg.demo.n_slices
    tgt = nib.load(str(case / "target.nii.gz"))
    assert tgt.shape == (16, 16, len(held))  # disk order (w, h, held-out slice)
    np.testing.assert_allclose(np.asarray(tgt.dataobj).T, np.clip(c["gt"][held], 0, 1), atol=1e-6)
    sax = nib.load(str(case / "input_sax.nii.gz"))
    assert sax.shape == (16, 16, cfg.demo.n_slices)
    dense = nib.load(str(out / "dense" / case.name / "pred.nii.gz"))
    assert dense.shape == (16, 16, D)
    # world position of dense slice mK == acquired slice m (voxel (0, 0, k) of each file)
    for mth in range(cfg.demo.n_slices):
        np.testing.assert_allclose(dense.affine @ [0, 0, mth * K, 1], sax.affine @ [0, 0, mth, 1], atol=1e-4)
    # a LAX pixel's world point is where the phantom's LAX affine puts it
    lax = nib.load(str(case / "input_lax_4ch.nii.gz"))
    ph = c["phantom"].lax["4ch"]
    assert lax.shape == (ph.image.shape[2], ph.image.shape[1], 1)
    np.testing.assert_allclose(lax.affine @ [3, 5, 0, 1], ph.affine @ [5, 3, 0, 1], atol=1e-4)
    np.testing.assert_allclose(np.asarray(lax.dataobj)[3, 5, 0], ph.image[cfg.demo.frame, 5, 3], atol=1e-6)
    assert (out / "figure.png").stat().st_size > 5000
    assert res["ours"] == pytest.approx(m["heldout"]["method"])


def test_recipe_and_budget(demo):
    _, _, m = demo
    cfg, _ = demo_config()
    assert m["train"]["steps"] == cfg.train.steps and m["train"]["resumed_at"] == cfg.train.steps // 2
    assert np.isfinite(m["train"]["final_loss"])
    assert not set(m["subjects"]["heldout"]) & set(m["subjects"]["train"])
    its = m["inverse"]["iterations"]
    assert len(its) == len(cfg.demo.heldout_seeds) and all(1 <= i <= cfg.inverse.iterations for i in its)
    assert m["seconds"]["total"] < 8 * 60  # LEARNING.md budget (prior + inverse, 2 CPU cores)


# The second phantom family (demo.family=base): the base plane lies between acquired slices 0 and 1, so the
# heart appears within the first gap, an edge that z-linear cross-fades and only the LAX planes show. The
# same trained prior reconstructs it with and without the LAX term.
LAX_MARGIN_BASE = 0.5  # dB, volume PSNR: ours >= ours without LAX + this (measured +0.8..+1.4 dB per case)


@pytest.fixture(scope="module")
def base_family(demo, tmp_path_factory):
    _, _, m = demo
    prior = m["train"]["checkpoint"]
    runs = {}
    for name, extra in (("lax", []), ("nolax", ["inverse.lambda_lax=0"])):
        out = tmp_path_factory.mktemp(f"mgdcr_base_{name}")
        run_demo(out, overrides=["demo.family=base", *extra], prior=prior)
        runs[name] = json.loads((out / "metrics.json").read_text())
    return runs


def test_lax_guidance_matters_on_the_base_family(base_family):
    lax, nolax = base_family["lax"]["heldout"], base_family["nolax"]["heldout"]
    assert base_family["lax"]["subjects"]["family"] == "base"
    assert nolax["baselines"]["z_linear"] == pytest.approx(lax["baselines"]["z_linear"])
    # z-linear cannot recover the base edge: well below its score on the apex family
    assert lax["baselines"]["z_linear"] < 24.0
    assert lax["method"] >= nolax["method"] + LAX_MARGIN_BASE, (lax["method"], nolax["method"])
    ps, ps0 = lax["psnr_slice_mean_db"], nolax["psnr_slice_mean_db"]
    assert ps["method"] >= ps0["method"] + LAX_MARGIN_BASE, (ps, ps0)
    assert ps["method"] >= ps["baselines"]["z_linear"] + PER_SLICE_MARGIN, ps
    assert lax["bloodpool_dice"]["method"] >= nolax["bloodpool_dice"]["method"]
    assert lax["bloodpool_dice"]["method"] >= lax["bloodpool_dice"]["baselines"]["z_linear"]
    # not asserted: on the volume, ours is level with z-linear on this family (README, "Not done yet")

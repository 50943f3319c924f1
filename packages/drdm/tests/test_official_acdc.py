"""Issue 13, real data with the official weights: ``drdm augment``'s per-slice sampler (``augment_units``, the
library call ``drdm augment`` makes for every slice) with the converted official CMR checkpoint on ACDC
patient001_frame01 slice 5 at T' = 48 reproduces the statistics of spec section 10 (the spec's own run of the
official code: mean |phi| 6.0 px, max 37.0 px = 14.4 % of S, fold 1.7 %; the paper: max > 10 % of S).

Skipped when the reference files are absent (``conftest.ref``). The official config is used as converted
(bicubic, zeros padding, R = 2, 80 reverse steps from T - 1, faithful lift), except ``augment.noise_step=0``
(every sample at T' = 48, the spec's setting, instead of 48, 50, 50, 52) and ``augment.random_permute=false``
(the official random flip/transpose only reorients the slice; off, the draws can be batched).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from drdm.convert import convert_official
from drdm.data import to_tensor_layout
from drdm.evaluate import deformation_metrics
from drdm.infer import augment_units, load_network
from medsynth_core.io import read_image

SEEDS = (0, 1, 2)
DRAWS = 2  # samples per seed, one batch: 6 draws in all (about 3.5 min on one shared CPU thread)
T_PRIME = 48

# Spec section 10 (the spec's run of the official code, CPU, slice 5 -> 256^2, T' = 48) and the paper's claim.
SPEC = {"mag_mean_px": 6.0, "fold": 0.017, "mag_max_pct_min": 10.0}
# Tolerances. The spec's figures are ONE draw of a wide distribution. Single draws of this sampler with the
# official weights: README seeds 0-4 (one draw each) mean |phi| 5.1-8.3 px; this test's 6 draws (measured)
# 6.0 / 6.8 / 8.0 / 9.0 / 9.1 / 11.1 px, mean 8.3, fold 0.2-1.9 % (mean 1.3 %), max 10.1-15.3 % of S (mean
# 12.2 %), Psi_rand fold 15.5 %. Over those 11 draws sd_draw is about 1.7 px for mean |phi| and 0.7 % for the
# fold. Comparing our mean over n = 6 draws with one draw, the difference has sd sd_draw * sqrt(1 + 1/n) =
# 1.08 sd_draw; the bounds are 2 of those: mean |phi| 6.0 +- 3.7 px, fold 1.7 +- 1.5 % (and well below
# Psi_rand's). The maximum is asserted as the paper states it, >= 10 % of S, on the mean over the draws
# (single draws fall below it, README).
MAG_MEAN_TOL_PX = 3.7
FOLD_TOL = 0.015


@pytest.fixture(scope="module")
def official_ckpt(ref, tmp_path_factory):
    src = ref / "cmr_recresacnet.pth"
    if not src.is_file() or not (ref / "config_cmr.yaml").is_file():
        pytest.skip("official CMR checkpoint or config_cmr.yaml missing")
    dst = tmp_path_factory.mktemp("official") / "cmr.pt"
    convert_official(src, dst, ref / "config_cmr.yaml")
    return dst


@pytest.mark.slow
def test_official_acdc_statistics(official_ckpt, ref):
    img = ref / "cmr" / "patient001_frame01.nii.gz"
    if not img.is_file():
        pytest.skip("ACDC sample patient001_frame01 missing")
    net, cfg = load_network(official_ckpt)
    assert cfg.diffusion.img_size == 256 and cfg.diffusion.resample_mode == "bicubic"
    assert cfg.augment.start_noise_step == T_PRIME and cfg.model.rec_num == 2
    cfg.augment.noise_step, cfg.augment.aug_coe = 0, DRAWS
    cfg.augment.random_permute, cfg.augment.batch_size = False, DRAWS
    torch.set_num_threads(1)
    arr = to_tensor_layout(read_image(img).array)[..., 5]
    s = cfg.diffusion.img_size
    rows = []
    for seed in SEEDS:
        torch.manual_seed(seed)
        items = augment_units(net.eval(), cfg, arr, None, 0)
        assert [it["t_start"] for it in items] == [T_PRIME] * DRAWS
        for it in items:
            # the spec's figures are taken on the 256^2 grid the model works on (fractions of S times S)
            phi = deformation_metrics(it["phi_norm"] * s)
            psi = deformation_metrics(it["psi_norm"] * s)
            rows.append({"seed": seed, **{f"phi_{k}": v for k, v in phi.items()}, "psi_fold": psi["fold"]})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "seed"}
    print("official ACDC T'=48 draws:", [{k: round(v, 4) for k, v in r.items()} for r in rows])
    print("official ACDC T'=48 mean:", {k: round(v, 4) for k, v in mean.items()})
    assert abs(mean["phi_mag_mean_px"] - SPEC["mag_mean_px"]) <= MAG_MEAN_TOL_PX, mean
    assert abs(mean["phi_fold"] - SPEC["fold"]) <= FOLD_TOL, mean
    assert mean["phi_mag_max_pct"] >= SPEC["mag_max_pct_min"], mean
    assert mean["psi_fold"] > 4 * mean["phi_fold"], mean  # recovery removes most of Psi_rand's folding
    # every seed contributes: no seed's draws are degenerate (zero or exploding fields)
    for seed in SEEDS:
        r = [x for x in rows if x["seed"] == seed]
        assert all(1.0 < x["phi_mag_mean_px"] < 20.0 for x in r), r

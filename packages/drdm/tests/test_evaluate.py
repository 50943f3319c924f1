"""The paper's evaluation metrics (spec section 10) and the ``evaluate`` verb's JSON + per-case CSV."""

import csv
import json

import numpy as np
import pytest
import torch

from drdm.cli import main
from drdm.evaluate import deformation_metrics, segmentation_metrics
from medsynth_core.io import write_image
from medsynth_core.phantoms import labelled_anatomy


def test_deformation_metrics_hand_values():
    s = 16
    zero = torch.zeros(2, s, s)
    m = deformation_metrics(zero, mask=torch.ones(s, s))
    assert m["fold"] == 0.0 and m["mag_max_px"] == 0.0 and m["fold_mask"] == 0.0
    # u_H = -2 * row index: d(x + u)/dx = -1 everywhere -> every voxel folds; |u| max = 2 (s-1) voxels
    rows = torch.arange(s, dtype=torch.float32)[:, None].expand(s, s)
    fold = torch.stack([-2.0 * rows, torch.zeros(s, s)])
    m = deformation_metrics(fold, mask=(rows < 4))
    assert m["fold"] == 1.0 and m["fold_mask"] == 1.0
    assert m["mag_max_px"] == pytest.approx(30.0) and m["mag_max_pct"] == pytest.approx(100 * 30 / 16)
    assert m["mag_max_px_mask"] == pytest.approx(6.0) and m["mag_mean_pct"] == pytest.approx(100 * 15 / 16)
    # translation by 3 voxels: no folding, 3 px everywhere
    m = deformation_metrics(torch.stack([torch.full((s, s), 3.0), torch.zeros(s, s)]))
    assert m["fold"] == 0.0 and m["mag_mean_px"] == pytest.approx(3.0)


def test_segmentation_metrics_hand_values():
    gt = torch.tensor([[1, 1, 1, 1], [2, 2, 0, 0]])
    pred = torch.tensor([[1, 1, 0, 0], [2, 2, 2, 2]])
    m = segmentation_metrics(pred, gt, n_classes=4)
    assert m["dsc_1"] == pytest.approx(2 * 2 / 6) and m["sensitivity_1"] == 0.5 and m["precision_1"] == 1.0
    assert m["dsc_2"] == pytest.approx(2 * 2 / 6) and m["sensitivity_2"] == 1.0 and m["precision_2"] == 0.5
    assert np.isnan(m["dsc_3"])  # structure 3 absent from the ground truth
    assert m["dsc_mean"] == pytest.approx(2 / 3) and m["sensitivity_mean"] == 0.75


def test_evaluate_cli_deformation_and_segmentation_csv(tmp_path, capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "demo",
                f"run.root={tmp_path}",
                "run.name=ev",
                "train.steps=1",
                "data.phantom_count=2",
                "train.sample_every=0",
            ]
        )
        == 0
    )
    ckpt = tmp_path / "drdm" / "ev" / "checkpoints" / "step_00000001.pt"
    for i in range(2):
        p = labelled_anatomy((32, 32), seed=70 + i)
        write_image(p.image, tmp_path / "img" / f"c{i}.nii.gz")
        write_image(p.labels.astype(np.int16), tmp_path / "lab" / f"c{i}_gt.nii.gz")
        write_image(np.where(p.labels == 2, 1, p.labels).astype(np.int16), tmp_path / "seg" / f"c{i}.nii.gz")
    capsys.readouterr()
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--out",
            str(tmp_path / "ev"),
            "--images",
            str(tmp_path / "img"),
            "--labels",
            str(tmp_path / "lab"),
            "--levels",
            "10",
            "--seeds",
            "1",
            "--t-start",
            "3",
            "augment.aug_coe=2",
            "augment.reverse_from_start=true",
        ]
    )
    assert rc == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["deformation"]["cases"] == 2 and m["deformation"]["samples"] == 4
    rows = list(csv.DictReader(open(tmp_path / "ev" / "deformation.csv")))
    assert len(rows) == 4 and {"phi_fold", "phi_mag_max_pct", "phi_fold_mask", "psi_rand_fold"} <= set(
        rows[0]
    )
    assert m["deformation"]["phi_fold"] == pytest.approx(np.mean([float(r["phi_fold"]) for r in rows]))
    rc = main(
        [
            "evaluate",
            "--out",
            str(tmp_path / "seg_ev"),
            "--segmentations",
            str(tmp_path / "seg"),
            "--labels",
            str(tmp_path / "lab"),
        ]
    )
    assert rc == 0
    seg = list(csv.DictReader(open(tmp_path / "seg_ev" / "segmentation.csv")))
    assert len(seg) == 2 and float(seg[0]["dsc_2"]) == 0.0 and float(seg[0]["dsc_1"]) < 1.0
    assert float(seg[0]["dsc_3"]) == pytest.approx(1.0)
    assert main(["evaluate", "--out", str(tmp_path / "x")]) == 2  # nothing to evaluate: one-line error

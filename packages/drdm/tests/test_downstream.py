"""``drdm downstream`` (issue 13, paper Table 2 in small): data, arms, files, CLI, bad input. The learning
margin (DRDM >= no augmentation + 0.02 Dice at k = 2 with the demo model) is in ``test_learns.py``."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from drdm.cli import main
from drdm.config import build_network, load
from drdm.downstream import (
    SegSettings,
    bigaug_transform,
    drdm_samples,
    folder_data,
    phantom_data,
    run_downstream,
)
from medsynth_core.checkpoint import atomic_torch_save, build_checkpoint
from medsynth_core.config import config_to_dict
from medsynth_core.io import MedicalImage, write_image

TINY = SegSettings(ks=(1, 2), seeds=(0, 1), steps=3, batch=2, channels=(4, 8), copies=2, n_test=3)


def _ckpt(tmp_path):
    cfg = load("demo")
    torch.manual_seed(0)
    net = build_network(cfg)
    path = tmp_path / "drdm.pt"
    atomic_torch_save(
        build_checkpoint(kind="drdm", step=0, models={"network": net}, config=config_to_dict(cfg)), path
    )
    return path, net.eval(), cfg


def _acdc_folders(root, n=3, shape=(40, 36, 3)):
    """ACDC layout: <stem>.nii.gz + <stem>_gt.nii.gz, 3 slices, the first one unlabelled."""
    for sub, count in (("tr", n), ("te", 2)):
        (root / sub / "img").mkdir(parents=True)
        (root / sub / "gt").mkdir(parents=True)
        for i in range(count):
            rng = np.random.default_rng(i + (100 if sub == "te" else 0))
            img = rng.random(shape).astype(np.float32) * 100
            lab = np.zeros(shape, np.uint8)
            lab[10:25, 8:20, 1:] = 1
            lab[14:20, 11:16, 1:] = 2
            lab[12:16, 20:26, 2] = 3
            aff = np.diag([1.5, 1.5, 10.0, 1.0])
            write_image(MedicalImage(img, aff, 3), root / sub / "img" / f"patient{i:03d}_frame01.nii.gz")
            write_image(MedicalImage(lab, aff, 3), root / sub / "gt" / f"patient{i:03d}_frame01_gt.nii.gz")


def test_phantom_data_and_drdm_samples():
    cfg = load("demo")
    d = phantom_data(32, 2, 2, 20_000, 3, 0.3)
    assert d.images.shape == (2, 1, 32, 32) and d.labels.shape == (2, 32, 32)
    assert d.images.min() >= 0 and d.images.max() <= 1 and set(d.labels.unique().tolist()) == {0, 1, 2, 3}
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    x, y = drdm_samples(net, cfg, d, 4, copies=3, seed=0)
    assert x.shape == (6, 1, 32, 32) and y.shape == (6, 32, 32) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {0, 1, 2, 3}  # nearest one-hot: hard labels
    assert not torch.equal(x[0], d.images[0])  # deformed
    x2, _ = drdm_samples(net, cfg, d, 4, copies=3, seed=0)
    assert torch.equal(x, x2)  # seeded


def test_bigaug_transform_deforms_image_and_labels_together():
    st = SegSettings(affine_prob=1.0, elastic_prob=1.0)
    d = phantom_data(32, 2, 1, 20_000, 3, 0.0)
    t = bigaug_transform(st, 32, 2, seed=0)
    out = t({"image": d.images[0], "label": d.labels[0][None].float()})
    img, lab = torch.as_tensor(out["image"]), torch.as_tensor(out["label"])
    assert img.shape == (1, 32, 32) and lab.shape == (1, 32, 32)
    assert set(lab.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}  # labels nearest
    assert not torch.equal(lab[0].long(), d.labels[0])
    # image and label get the same geometry: the labels passed as the image (bilinear) land on the labels
    t = bigaug_transform(st, 32, 2, seed=0)
    lab_f = d.labels[0][None].float()
    both = t({"image": lab_f, "label": lab_f})
    same = torch.as_tensor(both["image"]).round() == torch.as_tensor(both["label"])
    assert float(same.float().mean()) > 0.9


def test_run_downstream_phantoms_writes_files(tmp_path):
    _, net, cfg = _ckpt(tmp_path)
    res = run_downstream(net, cfg, tmp_path / "out", TINY)
    m = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert set(m["summary"]) == {"no_aug", "bigaug", "drdm"}
    for arm in m["summary"]:
        for k in ("1", "2"):
            blk = m["summary"][arm][k]
            assert len(blk["dsc_mean"]["per_seed"]) == 2
            assert 0.0 <= blk["dsc_mean"]["mean"] <= 1.0
            assert {"dsc_1", "sensitivity_2", "precision_3", "sensitivity_mean", "precision_mean"} <= set(blk)
            vals = blk["dsc_mean"]["per_seed"]
            assert blk["dsc_mean"]["std"] == pytest.approx(float(np.std(vals)), abs=1e-9)
    assert m["drdm_minus_no_aug_dsc"]["k1"] == pytest.approx(
        m["summary"]["drdm"]["1"]["dsc_mean"]["mean"] - m["summary"]["no_aug"]["1"]["dsc_mean"]["mean"]
    )
    with open(tmp_path / "out" / "cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 2 * 2 * TINY.n_test == len(res["rows"])
    # the JSON's per-seed means are the means of the CSV rows
    sel = [float(r["dsc_mean"]) for r in rows if r["arm"] == "bigaug" and r["k"] == "2" and r["seed"] == "1"]
    assert m["summary"]["bigaug"]["2"]["dsc_mean"]["per_seed"][1] == pytest.approx(np.mean(sel), abs=1e-6)
    assert (tmp_path / "out" / "figure.png").stat().st_size > 1000


def test_folder_data_acdc_layout(tmp_path):
    _acdc_folders(tmp_path)
    d = folder_data(tmp_path / "tr" / "img", tmp_path / "tr" / "gt", 32, 2)
    # 3 subjects x 2 labelled slices (slice 0 has no structure), resized to 32^2
    assert d.images.shape == (6, 1, 32, 32) and d.labels.shape == (6, 32, 32)
    assert sorted(set(d.groups)) == [f"patient{i:03d}_frame01" for i in range(3)]
    assert d.names[0] == "patient000_frame01_z001"
    assert float(d.images.min()) == 0.0 and float(d.images.max()) == 1.0
    assert d.subset(["patient001_frame01"]).images.shape[0] == 2


def _folder_args(tmp_path) -> list[str]:
    """The four ACDC-layout folders written by ``_acdc_folders``."""
    pairs = (
        ("--images", "tr/img"),
        ("--labels", "tr/gt"),
        ("--test-images", "te/img"),
        ("--test-labels", "te/gt"),
    )
    return [x for flag, rel in pairs for x in (flag, str(tmp_path / rel))]


def test_downstream_cli_on_folders(tmp_path, capsys):
    ckpt, _, _ = _ckpt(tmp_path)
    _acdc_folders(tmp_path)
    args = [
        "downstream", "--json",
        "--checkpoint",
        str(ckpt),
        *_folder_args(tmp_path),
        "--k",
        "1,3",
        "--seeds",
        "0",
        "--steps",
        "2",
        "--copies",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["dsc_mean"]) == {"no_aug", "bigaug", "drdm"}
    m = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert m["data"] == "folders" and m["n_test"] == 4 and m["n_classes"] == 4
    with open(tmp_path / "out" / "cases.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["case"] for r in rows} == {f"patient{i:03d}_frame01_z00{z}" for i in range(2) for z in (1, 2)}


def test_downstream_cli_bad_input(tmp_path, capsys):
    ckpt, _, _ = _ckpt(tmp_path)
    _acdc_folders(tmp_path, n=2)
    base = ["downstream", "--out", str(tmp_path / "o")]
    # the drdm arm without a checkpoint
    assert main(base) == 2
    assert "--checkpoint" in capsys.readouterr().err
    # an unknown arm
    assert main([*base, "--checkpoint", str(ckpt), "--arms", "no_aug,mixup"]) == 2
    assert "mixup" in capsys.readouterr().err
    # folder data without the held-out folders
    assert main([*base, "--checkpoint", str(ckpt), "--images", str(tmp_path / "tr" / "img")]) == 2
    assert "--test-images" in capsys.readouterr().err
    # more subjects asked than present
    folders = _folder_args(tmp_path)
    assert main([*base, "--checkpoint", str(ckpt), *folders, "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert "only 2 subject" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "downstream.json").exists()
    # the baseline arms run without a DRDM checkpoint
    assert main([*base, "--arms", "no_aug", "--k", "1", "--seeds", "0", "--steps", "1", "--n-test", "2"]) == 0

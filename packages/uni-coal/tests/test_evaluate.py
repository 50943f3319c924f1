"""Spec §8.10: metrics equal scikit-image, percentile normalisation of §6; synthesize on NIfTI."""

from __future__ import annotations

import numpy as np
import pytest

from uni_coal.evaluate import percentile_norm, psnr, ssim, volume_metrics


def test_metrics_equal_skimage():
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    t = rng.random((12, 20, 18))
    p = np.clip(t + rng.normal(0, 0.1, t.shape), 0, 1)
    assert psnr(t, p) == pytest.approx(skm.peak_signal_noise_ratio(t, p, data_range=1), abs=1e-6)
    assert ssim(t, p) == pytest.approx(skm.structural_similarity(t, p, data_range=1), abs=1e-6)
    assert ssim(t[3], p[3]) == pytest.approx(skm.structural_similarity(t[3], p[3], data_range=1), abs=1e-6)


def test_percentile_normalisation_and_volume_metrics():
    rng = np.random.default_rng(1)
    x = rng.normal(50, 20, (8, 16, 16))
    n = percentile_norm(x)
    lo, hi = np.percentile(x, [0.5, 99.5])
    np.testing.assert_allclose(n, (np.clip(x, max(lo, 0), hi) - max(lo, 0)) / (hi - max(lo, 0)))
    assert n.min() == 0 and n.max() == 1
    target = np.zeros((8, 16, 16))
    target[2:6] = rng.random((4, 16, 16)) * 200
    pred = target / 100.0 - 1.0  # perfect up to scale: the per-volume normalisation hides it (Q12)
    m = volume_metrics(target, pred)
    assert m["psnr"] > 80 and m["ssim"] == pytest.approx(1.0, abs=1e-6)
    m2 = volume_metrics(target, pred * 0.5, paper_norm=False)  # fixed-range variant sees the error
    assert m2["psnr"] < 40


def test_synthesize_nifti_geometry(tmp_path, demo_cfg):
    import SimpleITK as sitk
    import torch

    from medsynth_core import checkpoint as C
    from medsynth_core.config import config_to_dict
    from uni_coal.cli import main
    from uni_coal.data import phantom_volumes
    from uni_coal.model import UniCOALGenerator

    torch.manual_seed(0)
    g = UniCOALGenerator(demo_cfg.generator)
    C.atomic_torch_save(
        C.build_checkpoint(
            kind="uni-coal", step=0, models={"G_ema": g}, config=config_to_dict(demo_cfg), include_rng=False
        ),
        tmp_path / "c.pt",
    )
    vol = phantom_volumes(1, (12, 30, 36), ["T2"])[0]["T2"][::2]  # thick T2 (6 slices), in-plane != 32
    img = sitk.GetImageFromArray(vol.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 4.0))
    sitk.WriteImage(img, str(tmp_path / "in.nii.gz"))
    assert (
        main(
            [
                "synthesize",
                "--checkpoint",
                str(tmp_path / "c.pt"),
                "--input",
                str(tmp_path / "in.nii.gz"),
                "--output",
                str(tmp_path / "out.nii.gz"),
                "--target",
                "PD",
                "--thickness",
                "2",
            ]
        )
        == 0
    )
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert sitk.GetArrayFromImage(out).shape == (12, 30, 36)
    assert out.GetSpacing()[2] == pytest.approx(2.0)
    assert (tmp_path / "out.png").is_file()
    assert (
        main(
            [
                "synthesize",
                "--checkpoint",
                str(tmp_path / "c.pt"),
                "--input",
                str(tmp_path / "in.nii.gz"),
                "--output",
                str(tmp_path / "o2.nii.gz"),
                "--target",
                "FLAIR",
            ]
        )
        == 2
    )
    # evaluate CLI on the folder pair
    (tmp_path / "pred").mkdir()
    (tmp_path / "tgt").mkdir()
    sitk.WriteImage(out, str(tmp_path / "pred" / "s1.nii.gz"))
    sitk.WriteImage(out, str(tmp_path / "tgt" / "s1.nii.gz"))
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(tmp_path / "pred"),
                "--target",
                str(tmp_path / "tgt"),
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "metrics.csv").is_file()


def test_evaluate_checkpoint_on_h5_split(tmp_path, demo_cfg):
    import json

    import torch

    from medsynth_core import checkpoint as C
    from medsynth_core.config import config_to_dict
    from medsynth_core.io import write_h5
    from uni_coal.cli import main
    from uni_coal.data import phantom_volumes

    torch.manual_seed(0)
    from uni_coal.model import UniCOALGenerator

    g = UniCOALGenerator(demo_cfg.generator)
    C.atomic_torch_save(
        C.build_checkpoint(
            kind="uni-coal", step=0, models={"G_ema": g}, config=config_to_dict(demo_cfg), include_rng=False
        ),
        tmp_path / "c.pt",
    )
    for i, v in enumerate(phantom_volumes(2, (8, 32, 32), ["T1", "PD", "T2"], seed=5)):
        write_h5(tmp_path / "h5" / f"sub{i}.h5", v)
    (tmp_path / "test.txt").write_text("sub1\n")
    args = [
        "evaluate",
        "--checkpoint",
        str(tmp_path / "c.pt"),
        "--source",
        "T2",
        "--target",
        "T1",
        "--thickness",
        "2",
        "--out",
        str(tmp_path / "ev"),
        "data.kind=h5",
        f"data.root={tmp_path / 'h5'}",
        f"data.test_list={tmp_path / 'test.txt'}",
    ]
    assert main(args) == 0  # a T2 source works (official Q9 crash)
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert list(res["cases"]) == ["sub1"] and res["thickness"] == 2
    assert np.isfinite(res["mean"]["psnr"])

"""Faithful inference preprocessing (issue 14, spec §2-§3, ex8/ex10): N4 by default, the official LAX
harmonisation reference, empty slices dropped only where the fork drops them, fork LAX volumes on the whole
stack's grid, ex10's settings for --heldout, mixed precision that never changes CPU results, and the z-linear
baseline written beside the reconstruction."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core.io import MedicalImage, read_image, write_image
from medsynth_core.phantoms import cardiac_cine
from mgdcr import infer
from mgdcr.cli import main
from mgdcr.config import InverseConfig
from mgdcr.geometry import LaxPlane, dhw_to_ijk_affine

PKG = Path(__file__).resolve().parents[1]
MICRO = PKG / "configs" / "micro.yaml"


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    args = ["train", "--config", str(MICRO), f"run.root={root}", "train.steps=1", "train.sample_every=0"]
    assert main(args) == 0
    return root / "mgdcr" / "micro" / "checkpoints" / "step_00000001.pt"


def _lax_ijk(a):
    ijk = np.eye(4)
    ijk[:3, 0], ijk[:3, 1], ijk[:3, 2], ijk[:3, 3] = a[:3, 1], a[:3, 0], a[:3, 2], a[:3, 3]
    return ijk


def _write_case(tmp_path, n_slices=4, empty_first=False, scale=1.0):
    """A phantom cine as scanner-like files: SAX (T,Z,H,W) and three (T,1,r,c) LAX files."""
    ph = cardiac_cine(n_frames=2, n_slices=n_slices, size=16, seed=0)
    sax = ph.sax.astype(np.float32) * scale
    if empty_first:
        sax[:, 0] = 0
    path = tmp_path / "subj_sa.nii.gz"
    write_image(MedicalImage.from_dhw(sax, dhw_to_ijk_affine(ph.sax_affine)), path)
    laxes = []
    for v, p in ph.lax.items():
        lp = tmp_path / f"subj_{v}.nii.gz"
        write_image(
            MedicalImage.from_dhw(p.image[:, None].astype(np.float32) * scale, _lax_ijk(p.affine)), lp
        )
        laxes.append(str(lp))
    return ph, path, laxes


def _rec(ckpt, sax, laxes, out, *extra):
    return [
        "reconstruct",
        "--checkpoint",
        str(ckpt),
        "--sax",
        str(sax),
        "--lax",
        *laxes,
        "--out",
        str(out),
        *extra,
    ]


def _spy_n4(monkeypatch):
    calls = []
    real = infer.n4_correct

    def spy(x):
        calls.append(np.asarray(x).shape)
        return real(x)

    monkeypatch.setattr(infer, "n4_correct", spy)
    return calls


def test_n4_on_by_default_and_no_n4_skips_it(tmp_path, micro_ckpt, monkeypatch):
    """The official inference N4-corrects the SAX cine and every LAX image (ex8 L165, L225); --no-n4 skips it."""
    _, sax, laxes = _write_case(tmp_path)
    calls = _spy_n4(monkeypatch)
    assert main(_rec(micro_ckpt, sax, laxes, tmp_path / "a", "inverse.iterations=1")) == 0
    assert len(calls) == 5 and calls[:2] == [(4, 16, 16)] * 2  # the 2 SAX frames, then the 3 LAX planes
    assert all(c[0] == 1 for c in calls[2:])
    calls.clear()
    assert main(_rec(micro_ckpt, sax, laxes, tmp_path / "b", "inverse.iterations=1", "--no-n4")) == 0
    assert calls == []
    a = read_image(tmp_path / "a" / "subj_sa_frame_0_z_linear_13slice.nii.gz").array
    b = read_image(tmp_path / "b" / "subj_sa_frame_0_z_linear_13slice.nii.gz").array
    assert np.abs(a - b).max() > 1e-3  # N4 changed the SAX intensities the model saw
    # the encode verb prepares the SAX the same way
    calls.clear()
    assert main(["encode", "--checkpoint", str(micro_ckpt), "--input", str(sax), "--steps", "2",
                 "--out", str(tmp_path / "l.pt")]) == 0  # fmt: skip
    assert len(calls) == 2


def test_harmonisation_reference_official_and_model():
    """official: the linear volume of the raw SAX (no N4), p99 to [0,1] (ex8 L236-240), so it ignores the
    scanner scale; model: the linear volume of the SAX as the model sees it."""
    ph = cardiac_cine(n_frames=1, n_slices=4, size=16, seed=3)
    sax = ph.sax[0].astype(np.float64)
    cfg = InverseConfig(K=4)
    raw = sax * 937.0 + 0.0
    ref = infer.harmonise_reference(sax, raw, cfg)
    lin = infer.linear_interp_z(sax, 4)
    p99 = np.nanpercentile(lin, 99)
    np.testing.assert_allclose(ref, np.clip(lin, 0, p99) / p99, atol=1e-12)
    np.testing.assert_allclose(infer.harmonise_reference(sax, None, cfg), ref, atol=1e-12)
    model = infer.harmonise_reference(sax, raw, replace(cfg, harmonise_reference="model"))
    np.testing.assert_allclose(model, lin, atol=1e-12)
    assert np.abs(ref - model).max() > 0.05
    # the LAX targets are moment-matched to the chosen reference inside the ROI
    planes = [LaxPlane(ph.lax[v].image[0].astype(np.float64), ph.lax[v].affine, v) for v in ph.lax]
    for mode, want in (("official", ref), ("model", model)):
        c = replace(cfg, harmonise_reference=mode, iterations=0)
        res = infer.reconstruct(infer.IdentityPrior(), sax, ph.sax_affine, planes, c, sax_raw=raw)
        g, m = res.targets
        r = m > 0
        assert g[r].mean() == pytest.approx(want[r].mean(), abs=1e-9)
        assert g[r].std() == pytest.approx(want[r].std(), abs=1e-9)


def test_kept_slices_where_the_fork_drops_them():
    x = np.zeros((4, 3, 3))
    x[1] = 0.3
    x[2, 0, 0] = 0.5  # max of the [-1, 1] slice is exactly 0: the fork drops it
    x[3] = 1.0
    assert infer.kept_slices(x, "official") == [0, 1, 3]  # the all-zero slice 0 is at -1: kept
    assert infer.kept_slices(x, "zero") == [1, 2, 3]
    assert infer.kept_slices(x, "none") == [0, 1, 2, 3]
    assert InverseConfig().drop_empty == "official"


def test_empty_slices_and_fork_lax_volumes(tmp_path, micro_ckpt, capsys):
    """An all-zero SAX slice is kept by default (as the fork) and dropped with drop_empty=zero, the geometry
    then from the kept slices; a fork LAX volume on the whole stack's grid (K(Z-1)+1) is accepted either way."""
    ph, sax, laxes = _write_case(tmp_path, empty_first=True)
    K, Z = 4, 4
    g = np.zeros((K * (Z - 1) + 1, 16, 16), np.float32)
    g[:, 8, :] = np.linspace(0.1, 1.0, g.shape[0])[:, None]  # one horizontal LAX row per dense slice
    m = (g > 0).astype(np.float32)
    dense_aff = dhw_to_ijk_affine(infer.output_affine(ph.sax_affine, list(range(Z)), Z, K))
    for name, a in (("lax.nii.gz", g), ("mask.nii.gz", m)):
        write_image(MedicalImage.from_dhw(a, dense_aff), tmp_path / name)
    fork = ["--lax-volume", str(tmp_path / "lax.nii.gz"), "--lax-mask", str(tmp_path / "mask.nii.gz")]
    base = [
        "reconstruct",
        "--checkpoint",
        str(micro_ckpt),
        "--sax",
        str(sax),
        "--no-n4",
    ]
    assert main([*base, *fork, "--out", str(tmp_path / "all"), "inverse.iterations=1"]) == 0
    assert read_image(tmp_path / "all" / "subj_sa_frame_0_final_13slice.nii.gz").to_dhw().shape == (
        13,
        16,
        16,
    )
    assert (
        main(
            [*base, *fork, "--out", str(tmp_path / "kept"), "inverse.iterations=1", "inverse.drop_empty=zero"]
        )
        == 0
    )
    img = read_image(tmp_path / "kept" / "subj_sa_frame_0_final_9slice.nii.gz")
    # geometry from the kept slices: dense slice 0 sits on acquired slice 1
    np.testing.assert_allclose(
        img.affine @ [0, 0, 0, 1], dhw_to_ijk_affine(ph.sax_affine) @ [0, 0, 1, 1], atol=1e-4
    )
    # a LAX volume of neither size is refused, naming the file and both grids
    write_image(MedicalImage.from_dhw(g[:7], dense_aff), tmp_path / "bad.nii.gz")
    bad = ["--lax-volume", str(tmp_path / "bad.nii.gz"), "--lax-mask", str(tmp_path / "mask.nii.gz")]
    assert main([*base, *bad, "--out", str(tmp_path / "x"), "inverse.iterations=1"]) == 2
    err = capsys.readouterr().err
    assert "bad.nii.gz" in err and "(13, 16, 16)" in err


def test_read_lax_volume_crops_the_whole_stack_grid(tmp_path):
    from mgdcr.cli import _read_lax_volume

    g = np.arange(13 * 4 * 4, dtype=np.float32).reshape(13, 4, 4) + 1
    for name in ("g.nii.gz", "m.nii.gz"):
        write_image(MedicalImage.from_dhw(g, np.eye(4)), tmp_path / name)
    G, M = _read_lax_volume(
        str(tmp_path / "g.nii.gz"), str(tmp_path / "m.nii.gz"), [1, 2, 3], 4, (4, 4), 4, False
    )
    full = infer.percentile_normalise(g.astype(np.float64), 99.0)  # p99 of the file as written
    np.testing.assert_allclose(G, full[4:13]) and np.testing.assert_array_equal(M, np.ones((9, 4, 4)))
    G2, _ = _read_lax_volume(
        str(tmp_path / "g.nii.gz"), str(tmp_path / "m.nii.gz"), [0, 1, 2, 3], 4, (4, 4), 4, False
    )
    assert G2.shape == (13, 4, 4)


def test_heldout_uses_ex10_settings(tmp_path, micro_ckpt, monkeypatch):
    _, sax, laxes = _write_case(tmp_path, n_slices=5)
    calls = _spy_n4(monkeypatch)
    assert main(_rec(micro_ckpt, sax, laxes, tmp_path / "h", "--heldout", "2", "inverse.iterations=1")) == 0
    r = json.loads((tmp_path / "h" / "subj_sa_frame_0_heldout.json").read_text())
    s = r["settings"]
    assert (s["lambda_lax"], s["lambda_smooth"], s["lr"], s["n4"]) == (6.0, 3.0, 1e-3, False)
    assert s["freeze_ends"] and s["K_filled"] == 7 and s["seed"] == 2 and r["heldout_index"] in (1, 2, 3)
    assert calls == []  # ex10: no N4
    # the user's overrides win over ex10's
    args = _rec(
        micro_ckpt, sax, laxes, tmp_path / "h2", "--heldout", "2", "inverse.iterations=1", "inverse.lr=5e-4"
    )
    assert main(args) == 0
    assert (
        json.loads((tmp_path / "h2" / "subj_sa_frame_0_heldout.json").read_text())["settings"]["lr"] == 5e-4
    )


def test_amp_never_changes_cpu_results():
    """--amp fp16/bf16 applies on CUDA only: on CPU the reconstruction is bit-identical to amp=off."""
    from mgdcr.demo import phantom_case
    from mgdcr.diffusion import GaussianDiffusion
    from mgdcr.model import DiffAE, ModelConfig

    torch.manual_seed(0)
    mc = ModelConfig(image_size=16, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), embed_channels=64, z_channels=32, enc_channel_mult=(1, 2, 2),
                     dropout=0.0, norm_groups=8)  # fmt: skip
    model = DiffAE(mc)
    for p in model.parameters():  # a non-zero output layer, so the decoder depends on (x_T, z)
        p.data.add_(0.02 * torch.randn_like(p))
    prior = infer.DiffAEPrior(model, GaussianDiffusion(), 3, 3, flip_h=False)
    case = phantom_case(n_slices=3, K=2, size=16, seed=0)
    outs = {}
    for amp in ("off", "fp16", "bf16"):
        cfg = InverseConfig(K=2, encode_steps=3, decode_steps=3, iterations=3, amp=amp, flip_h=False)
        torch.manual_seed(0)
        outs[amp] = infer.reconstruct(prior, case["sax"], case["sax_affine"], case["planes"], cfg)
    assert outs["off"].history[0]["loss"] != outs["off"].history[-1]["loss"]  # it optimised
    for amp in ("fp16", "bf16"):
        np.testing.assert_array_equal(outs[amp].volume, outs["off"].volume)
        assert outs[amp].history == outs["off"].history
    assert InverseConfig().amp == "fp16"  # the official setting, on CUDA


def test_reconstruct_writes_z_linear_for_evaluate(tmp_path, micro_ckpt):
    """The README's evaluate example: reconstruct writes the z-linear baseline beside its output, on the same
    grid, and evaluate scores both."""
    ph, sax, laxes = _write_case(tmp_path)
    out = tmp_path / "recon"
    assert main(_rec(micro_ckpt, sax, laxes, out, "--no-n4", "inverse.iterations=1")) == 0
    final = read_image(out / "subj_sa_frame_0_final_13slice.nii.gz")
    lin = read_image(out / "subj_sa_frame_0_z_linear_13slice.nii.gz")
    np.testing.assert_allclose(lin.affine, final.affine)
    x = infer.percentile_normalise(ph.sax.astype(np.float64), 98.0)[0]
    np.testing.assert_allclose(lin.to_dhw(), infer.linear_interp_z(x, 4), atol=1e-6)
    gt = tmp_path / "dense_gt.nii.gz"
    write_image(lin.with_array(np.clip(lin.array + 0.02, 0, 1)), gt)
    pred = [
        str(out / "subj_sa_frame_0_final_13slice.nii.gz"),
        str(out / "subj_sa_frame_0_z_linear_13slice.nii.gz"),
    ]
    args = [
        "evaluate",
        "--pred",
        *pred,
        "--gt",
        str(gt),
        "--K",
        "4",
        "--out",
        str(tmp_path / "eval" / "metrics.json"),
    ]
    assert main(args) == 0
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["subj_sa_frame_0_z_linear_13slice.nii.gz"]["acquired_psnr"] == pytest.approx(
        20 * np.log10(1 / 0.02), abs=0.5
    )


def test_heldout_takes_ex10_rows_of_the_whole_stack(monkeypatch):
    """ex10 L199-220: the LAX targets and the harmonisation reference of the held-out gap are rows
    K(m-1) … K(m+1) of the whole stack's dense grid (reference: p99 over the whole linear volume)."""
    from mgdcr.evaluate import choose_heldout, heldout_slice_eval

    ph = cardiac_cine(n_frames=1, n_slices=5, size=16, seed=1)
    sax = ph.sax[0].astype(np.float64)
    K = 2
    D = K * 4 + 1
    g = np.random.default_rng(0).random((D, 16, 16))
    msk = (g > 0.5).astype(np.float64)
    seen = {}
    real = infer.reconstruct

    def spy(prior, pair, aff, planes, cfg, targets=None, reference=None, **kw):
        seen.update(pair=pair, targets=targets, reference=reference, K=cfg.K, freeze=cfg.freeze_ends)
        return real(prior, pair, aff, planes, cfg, targets=targets, reference=reference, **kw)

    monkeypatch.setattr(infer, "reconstruct", spy)
    cfg = InverseConfig(K=K, iterations=1)
    raw = sax * 500.0
    r = heldout_slice_eval(
        infer.IdentityPrior(), sax, ph.sax_affine, [], cfg, seed=4, targets=(g, msk), sax_raw=raw
    )
    m = choose_heldout(5, 4)
    assert r["heldout_index"] == m and seen["K"] == 2 * K and seen["freeze"]
    rows = slice(K * (m - 1), K * (m + 1) + 1)
    np.testing.assert_array_equal(seen["targets"][0], g[rows])
    np.testing.assert_array_equal(seen["targets"][1], msk[rows])
    np.testing.assert_allclose(seen["reference"], infer.harmonise_reference(sax, raw, cfg)[rows])
    np.testing.assert_array_equal(seen["pair"], sax[[m - 1, m + 1]])


def test_heldout_cli_with_a_fork_lax_volume(tmp_path, micro_ckpt):
    _, sax, _ = _write_case(tmp_path, n_slices=5)
    g = np.zeros((17, 16, 16), np.float32)
    g[:, 8] = 0.7
    for name, a in (("lax.nii.gz", g), ("mask.nii.gz", (g > 0).astype(np.float32))):
        write_image(MedicalImage.from_dhw(a, np.eye(4)), tmp_path / name)
    args = ["reconstruct", "--checkpoint", str(micro_ckpt), "--sax", str(sax), "--lax-volume",
            str(tmp_path / "lax.nii.gz"), "--lax-mask", str(tmp_path / "mask.nii.gz"), "--heldout", "1",
            "--out", str(tmp_path / "h"), "inverse.iterations=1"]  # fmt: skip
    assert main(args) == 0
    r = json.loads((tmp_path / "h" / "subj_sa_frame_0_heldout.json").read_text())
    assert np.isfinite(r["diffae_lax"]["psnr"]) and r["settings"]["lambda_lax"] == 6.0

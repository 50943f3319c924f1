import numpy as np
import pytest
import torch

from drdm.config import build_diffusion, build_network, load
from drdm.deform import DeformationDiffusion
from drdm.infer import augment_folder, noise_steps, one_hot, recover, warp_labels
from medsynth_core.io import read_image, write_image
from medsynth_core.phantoms import labelled_anatomy


def _random_field(s=32, amp=0.08, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(
        torch.randn(1, 2, 4, 4, generator=g) * amp, [s, s], mode="bilinear", align_corners=True
    )


def test_noise_step_sequences():
    cmr = noise_steps(48, 2, 32)
    assert cmr[:6] == [48, 50, 50, 52, 52, 54] and cmr[-3:] == [78, 78, 80] and len(cmr) == 32
    lct = noise_steps(64, 1, 32)
    assert lct[:5] == [64, 65, 65, 66, 66] and lct[-3:] == [79, 79, 80]


def test_label_modes():
    """Checklist 12 / Q4: nearest one-hot is binary and sums to 1; bicubic 'image' mode leaves [0, 1]."""
    lab = torch.from_numpy(labelled_anatomy((32, 32), seed=1).labels)[None]
    oh = one_hot(lab, 4)
    u = _random_field()
    for mode in ("nearest", "linear_onehot_argmax"):
        out = warp_labels(oh, u, mode)
        assert set(out.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(out.sum(1), torch.ones_like(out.sum(1)))
    soft = warp_labels(oh, u, "image", resample_mode="bicubic")
    assert soft.min() < 0 or soft.max() > 1


def test_recover_shapes_and_reverse_flag():
    cfg = load("demo")
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(int(i[1][0])))
    diff = build_diffusion(cfg, sampling=True)
    x = torch.from_numpy(labelled_anatomy((32, 32), seed=2).image)[None, None]
    rec = recover(
        net, diff, x, 6, one_hot(torch.from_numpy(labelled_anatomy((32, 32), seed=2).labels)[None], 4)
    )
    assert rec.phi.shape == (1, 2, 32, 32) and rec.labels.shape == (1, 4, 32, 32)
    assert calls == list(range(79, -1, -1))  # official: always from T-1 (Q3)
    calls.clear()
    recover(net, diff, x, 6, reverse_from_start=True)
    assert calls == [5, 4, 3, 2, 1, 0]


def test_determinism():
    """Checklist 14: same seed, bit-identical CPU outputs."""
    cfg = load("demo")
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    diff = build_diffusion(cfg, sampling=True)
    x = torch.rand(1, 1, 32, 32)
    outs = []
    for _ in range(2):
        torch.manual_seed(5)
        outs.append(recover(net, diff, x, 10, reverse_from_start=True))
    assert torch.equal(outs[0].phi, outs[1].phi) and torch.equal(outs[0].image, outs[1].image)


def _phantom_folder(tmp_path, n=1, nd=2, size=32):
    aff = np.array([[0, 1.25, 0, 10], [1.5, 0, 0, -3], [0, 0, 2.0, 5], [0, 0, 0, 1]])
    for i in range(n):
        p = labelled_anatomy((size,) * nd, seed=40 + i)
        write_image(p.image * 100, tmp_path / "img" / f"case{i}.nii.gz", affine=aff)
        write_image(p.labels.astype(np.int16), tmp_path / "lab" / f"case{i}_gt.nii.gz", affine=aff)
    return aff


@pytest.mark.parametrize("keep_affine", [True, False])
def test_augment_driver_on_phantoms(tmp_path, keep_affine):
    """Checklist 13: sample count and T' sequence, _GT original holds the mask, affine kept with the fix flag."""
    aff = _phantom_folder(tmp_path)
    cfg = load(
        "demo",
        [
            "augment.aug_coe=3",
            f"augment.keep_affine={keep_affine}",
            "augment.reverse_from_start=true",
            "augment.start_noise_step=4",
        ],
    )
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    res = augment_folder(net, cfg, tmp_path / "img", tmp_path / "out", labels=tmp_path / "lab")
    names = set(res["written"])
    steps = noise_steps(4, 2, 3)
    assert steps == [4, 6, 6]
    for k, t in enumerate(steps):
        for suffix in ("", "_GT", "_DDF"):
            assert f"case0_AugImg{k:04d}_NoiseStep{t:04d}{suffix}.nii.gz" in names
    org_gt = read_image(tmp_path / "out" / "case0_ORG_NA_GT.nii.gz", dtype=None)
    src_lab = read_image(tmp_path / "lab" / "case0_gt.nii.gz", dtype=None)
    assert np.array_equal(org_gt.array, src_lab.array)  # Q11 fix: the mask, not the image
    out = read_image(tmp_path / "out" / f"case0_AugImg0000_NoiseStep{steps[0]:04d}_GT.nii.gz", dtype=None)
    assert set(np.unique(out.array)) <= set(np.unique(src_lab.array))
    ddf = read_image(tmp_path / "out" / f"case0_AugImg0000_NoiseStep{steps[0]:04d}_DDF.nii.gz")
    assert ddf.array.shape == (32, 32, 2)
    expected = aff if keep_affine else np.eye(4)
    assert np.allclose(out.affine, expected, atol=1e-5) and np.allclose(ddf.affine, expected, atol=1e-5)
    assert (tmp_path / "out" / "preview.png").is_file()


def test_augment_label_folder_mismatch(tmp_path):
    from medsynth_core.cli import UserError

    _phantom_folder(tmp_path)
    (tmp_path / "lab" / "case0_gt.nii.gz").rename(tmp_path / "lab" / "other.nii.gz")
    cfg = load("demo", ["augment.aug_coe=1"])
    with pytest.raises(UserError, match="no label file"):
        augment_folder(
            build_network(cfg).eval(), cfg, tmp_path / "img", tmp_path / "out", labels=tmp_path / "lab"
        )


def test_augment_cmr_sample(ref, tmp_path):
    """drdm augment on the sample ACDC volume: every slice, labels binary-derived, original affine kept."""
    src = ref / "cmr"
    img_dir, lab_dir = tmp_path / "img", tmp_path / "lab"
    img_dir.mkdir()
    lab_dir.mkdir()
    (img_dir / "patient001_frame01.nii.gz").symlink_to(src / "patient001_frame01.nii.gz")
    (lab_dir / "patient001_frame01_gt.nii.gz").symlink_to(src / "patient001_frame01_gt.nii.gz")
    cfg = load(
        "demo",
        [
            "augment.aug_coe=1",
            "augment.reverse_from_start=true",
            "augment.start_noise_step=4",
            "augment.save_noisy=false",
        ],
    )
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    augment_folder(net, cfg, img_dir, tmp_path / "out", labels=lab_dir)
    src_img = read_image(src / "patient001_frame01.nii.gz")
    out = read_image(tmp_path / "out" / "patient001_frame01_AugImg0000_NoiseStep0004.nii.gz")
    lab = read_image(tmp_path / "out" / "patient001_frame01_AugImg0000_NoiseStep0004_GT.nii.gz", dtype=None)
    assert out.array.shape == src_img.array.shape == (216, 256, 10)
    assert np.allclose(out.affine, src_img.affine, atol=1e-4)
    assert set(np.unique(lab.array)) <= {0, 1, 2, 3}
    ddf = read_image(tmp_path / "out" / "patient001_frame01_AugImg0000_NoiseStep0004_DDF.nii.gz")
    assert ddf.array.shape == (216, 256, 10, 2)


@pytest.mark.slow
@torch.no_grad()
def test_official_recovery_acdc_slice(official_net, ref):
    """Checklist 11: official weights, ACDC slice 5 -> 256^2, T'=48: phi smaller and less folded than Psi_rand,
    max |S phi| >= 10 % of S.

    The maximum is a property of one random draw: single draws (seeds 0-4) give 6.9-14.1 % (the spec's own run:
    14.4 %). It is asserted on the mean over a batch of 4 draws (measured 13.2 %, fold 1.5 %; Psi_rand 15.5 % fold,
    as in the spec's run), not on a hand-picked seed."""
    from drdm.data import minmax, resize
    from drdm.evaluate import field_stats

    arr = read_image(ref / "cmr" / "patient001_frame01.nii.gz").array[..., 5]
    x = minmax(resize(torch.from_numpy(np.asarray(arr, np.float32))[None], 256))[None]
    diff = DeformationDiffusion(ndims=2, img_size=256, resample_mode="bicubic")
    torch.manual_seed(0)
    rec = recover(official_net, diff, x.repeat(4, 1, 1, 1), 48, padding_mode="zeros")
    phi, psi = field_stats(rec.phi), field_stats(rec.psi_rand)
    assert phi["mag_mean"] < psi["mag_mean"]
    assert phi["fold"] < psi["fold"]
    assert phi["fold"] < 0.03  # spec's run: 1.7 %
    assert phi["mag_max_pct"] >= 10.0


def test_augment_3d_volume(tmp_path):
    """3D path (16^3 phantom, demo3d settings): outputs keep shape and affine, labels stay in the label set."""
    _phantom_folder(tmp_path, nd=3, size=16)
    cfg = load(
        "demo",
        [
            "model.ndims=3",
            "diffusion.img_size=16",
            "diffusion.ctl_sz=16",
            "diffusion.v_scale=4e-4",
            "augment.aug_coe=2",
            "augment.reverse_from_start=true",
            "augment.start_noise_step=3",
        ],
    )
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    augment_folder(net, cfg, tmp_path / "img", tmp_path / "out", labels=tmp_path / "lab")
    out = read_image(tmp_path / "out" / "case0_AugImg0001_NoiseStep0003_GT.nii.gz", dtype=None)
    ddf = read_image(tmp_path / "out" / "case0_AugImg0001_NoiseStep0003_DDF.nii.gz")
    assert out.array.shape == (16, 16, 16) and ddf.array.shape == (16, 16, 16, 3)
    assert set(np.unique(out.array)) <= {0, 1, 2, 3}


def test_folder_dataset(tmp_path):
    from drdm.data import FolderImages
    from medsynth_core.io import MedicalIOError

    vol = np.stack([labelled_anatomy((24, 24), seed=i).image for i in range(3)], axis=-1)
    write_image(vol, tmp_path / "d" / "stack.nii.gz")
    ds = FolderImages(tmp_path / "d", ndims=2, size=32)
    assert (
        len(ds) == 3
        and ds[0].shape == (1, 32, 32)
        and float(ds[0].min()) == 0.0
        and float(ds[0].max()) == 1.0
    )
    (tmp_path / "e").mkdir()
    with pytest.raises(MedicalIOError):
        FolderImages(tmp_path / "e", ndims=2, size=32)


def test_random_permute_flag(tmp_path):
    """Q13: the official cumulative random flip/transpose (python RNG), square inputs only."""
    import random

    from drdm.infer import _random_permute
    from medsynth_core.cli import UserError

    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    random.seed(3)
    seen = set()
    for _ in range(12):
        (y,) = _random_permute([x], 2)
        assert sorted(y.flatten().tolist()) == x.flatten().tolist()
        seen.add(tuple(y.flatten().tolist()))
    assert len(seen) > 1
    _phantom_folder(tmp_path)
    cfg = load(
        "demo",
        [
            "augment.aug_coe=2",
            "augment.random_permute=true",
            "augment.reverse_from_start=true",
            "augment.start_noise_step=2",
        ],
    )
    net = build_network(cfg).eval()
    res = augment_folder(net, cfg, tmp_path / "img", tmp_path / "out", labels=tmp_path / "lab")
    assert len(res["written"]) == 2 + 2 * 5
    write_image(np.zeros((32, 24), np.float32), tmp_path / "rect" / "r.nii.gz")
    with pytest.raises(UserError, match="square"):
        augment_folder(net, cfg, tmp_path / "rect", tmp_path / "out2")


def test_augment_warns_on_constant_image(tmp_path, caplog):
    """Issue 18: an all-zero image passed through augment silently; now one warning names the file."""
    import logging

    write_image(np.zeros((32, 32), np.float32), tmp_path / "img" / "blank.nii.gz")
    _phantom_folder(tmp_path)
    cfg = load("demo", ["augment.aug_coe=1", "augment.start_noise_step=2", "augment.reverse_from_start=true"])
    with caplog.at_level(logging.WARNING, logger="medsynth"):
        augment_folder(build_network(cfg).eval(), cfg, tmp_path / "img", tmp_path / "out")
    msgs = [r.getMessage() for r in caplog.records if r.name == "medsynth"]
    assert len(msgs) == 1 and "blank.nii.gz: image is all zero" in msgs[0], msgs

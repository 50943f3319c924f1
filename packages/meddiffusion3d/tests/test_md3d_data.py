"""Data: intensity handling (unit / CT window / MR percentiles), NIfTI + spacing, crops that avoid empty
background, deterministic per-(seed, epoch, index) augmentation, stage-2 shapes, split, clear errors."""

import numpy as np
import pytest

from meddiffusion3d.config import DataConfig
from meddiffusion3d.data import (
    PatchDataset,
    VolumeSource,
    WholeVolumeDataset,
    load_volume,
    split_files,
    stage2_shape,
)
from medsynth_core import io as mio


def test_intensity_modes(tmp_path):
    hu = np.full((8, 8, 8), -2000.0, np.float32)
    hu[2:6, 2:6, 2:6] = 500.0
    hu[0, 0, 0] = 0.0
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mio.write_image(mio.MedicalImage.from_dhw(hu, aff), tmp_path / "ct.nii.gz")
    v, _ = load_volume(tmp_path / "ct.nii.gz", DataConfig(intensity="ct", ct_window=(-1000.0, 1000.0)))
    assert v.min() == -1.0 and v[3, 3, 3] == pytest.approx(0.5) and v[0, 0, 0] == pytest.approx(0.0)
    v, img = load_volume(tmp_path / "ct.nii.gz", DataConfig(intensity="ct", spacing=(1.0, 1.0, 1.0)))
    assert v.shape == (16, 16, 16) and np.allclose(img.spacing, 1.0)
    mr = np.random.default_rng(0).gamma(2.0, 100.0, (8, 8, 8)).astype(np.float32)
    mio.write_image(mio.MedicalImage.from_dhw(mr, aff), tmp_path / "mr.nii.gz")
    v, _ = load_volume(tmp_path / "mr.nii.gz", DataConfig(intensity="mr"))
    assert v.min() == pytest.approx(-1.0) and v.max() == pytest.approx(1.0)
    unit = np.linspace(0, 1, 512, dtype=np.float32).reshape(8, 8, 8)
    mio.write_image(mio.MedicalImage.from_dhw(unit, aff), tmp_path / "u.nii.gz")
    v, _ = load_volume(tmp_path / "u.nii.gz", DataConfig(intensity="unit"))
    assert np.allclose(v, unit * 2 - 1, atol=1e-6)
    with pytest.raises(mio.MedicalIOError, match="intensity=ct"):
        load_volume(tmp_path / "ct.nii.gz", DataConfig(intensity="unit"))


def test_patch_crops_avoid_background_and_are_deterministic():
    vol = np.full((32, 32, 32), -1.0, np.float32)
    vol[24:, 24:, 24:] = 0.5  # only one corner has content
    src = VolumeSource(DataConfig(synthetic=True, n_volumes=1, volume=(32, 32, 32)))
    src.arrays = [vol]
    ds = PatchDataset(src, 16, seed=3)
    a = ds[0]
    assert a.shape == (1, 16, 16, 16) and (a > -1).any()
    assert np.array_equal(a.numpy(), ds[0].numpy())  # same (seed, epoch, index) → same crop
    for epoch in range(1, 6):  # other epochs draw other crops, never an all-background one
        ds.set_epoch(epoch)
        assert (ds[0] > -1).any()
    with pytest.raises(ValueError, match="smaller than the"):
        PatchDataset(src, 64)[0]


def test_stage2_shapes_and_split():
    cfg = DataConfig(patch=64, stage2_max_voxels=256 * 256 * 128, stage2_crop=(192, 192, 192))
    assert stage2_shape((256, 256, 128), cfg) == (256, 256, 128)
    assert stage2_shape((300, 300, 300), cfg) == (192, 192, 192)
    assert stage2_shape((130, 200, 64), cfg) == (128, 192, 64)
    files = [f"f{i}" for i in range(50)]
    train, val = split_files(files, DataConfig(val_files=40))
    assert len(train) == 10 and len(val) == 40 and sorted(train + val) == sorted(files)
    assert split_files(files, DataConfig(val_files=40)) == (train, val)  # seed 216, reproducible
    src = VolumeSource(DataConfig(synthetic=True, n_volumes=2, volume=(32, 32, 20), patch=16))
    assert WholeVolumeDataset(src, src.cfg)[1].shape == (1, 32, 32, 16)


def test_missing_or_empty_data_folder(tmp_path):
    with pytest.raises(mio.MedicalIOError, match="data.root"):
        VolumeSource(DataConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(mio.MedicalIOError):
        VolumeSource(DataConfig(root=str(tmp_path / "empty")))


def test_split_is_the_official_python_shuffle():
    """VQGANDataset: ``random.seed(216); random.shuffle(files)``, the last 40 held out (on sorted files)."""
    import random

    files = [f"case_{i:03d}.nii.gz" for i in range(57)]
    expect = list(files)
    random.seed(216)
    random.shuffle(expect)
    train, val = split_files(files, DataConfig(val_files=40))
    assert train == expect[:-40] and val == expect[-40:]
    few_train, few_val = split_files(files[:40], DataConfig(val_files=40))  # nothing left to hold out
    assert few_val == [] and sorted(few_train) == files[:40]


def test_augmentation_flips_each_in_plane_axis_on_its_own_draw_then_rot90():
    """tio.RandomFlip(axes=(0, 1)) draws per axis; then rot90 over (H, W); D is never touched."""
    from meddiffusion3d.data import _augment

    x = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4)
    rng = np.random.default_rng(0)
    assert np.array_equal(_augment(x, rng, 0.0, 0.0), x)
    assert np.array_equal(_augment(x, rng, 1.0, 1.0), np.rot90(x[:, ::-1, ::-1], 1, axes=(1, 2)))
    seen = set()
    for _ in range(200):
        y = _augment(x, rng, 0.5, 0.0)
        seen.add(
            next(
                k
                for k, f in enumerate((x, x[:, ::-1], x[:, :, ::-1], x[:, ::-1, ::-1]))
                if np.array_equal(y, f)
            )
        )
    assert seen == {0, 1, 2, 3}  # both axes alone and together: independent draws


def test_stage2_volumes_are_augmented_and_batches_keep_their_shape():
    src = VolumeSource(DataConfig(synthetic=True, n_volumes=2, volume=(32, 32, 16), patch=16))
    cfg = DataConfig(synthetic=True, n_volumes=2, volume=(32, 32, 16), patch=16, flip_p=1.0, rot_p=1.0)
    plain = WholeVolumeDataset(src, cfg)[0][0].numpy()
    one = WholeVolumeDataset(src, cfg, augment=True, batch=1)[0][0].numpy()
    assert one.shape == (32, 16, 32) and np.array_equal(one, np.rot90(plain[:, ::-1, ::-1], 1, axes=(1, 2)))
    two = WholeVolumeDataset(src, cfg, augment=True, batch=2)[0][0].numpy()  # H != W: flips only
    assert two.shape == (32, 32, 16) and np.array_equal(two, plain[:, ::-1, ::-1])

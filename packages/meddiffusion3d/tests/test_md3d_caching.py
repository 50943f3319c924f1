"""Caching (issue 16 "speed that makes it fit"): stage-1 crops from volumes read once (``data.cache_volumes``),
ControlNet pairs encoded once (``controlnet.cache_latents``); each flag both ways."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import demo_config  # noqa: E402

from meddiffusion3d import data as mdata  # noqa: E402
from medsynth_core import io as mio  # noqa: E402


@pytest.fixture
def volume_files(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        v = np.clip(rng.standard_normal((32, 32, 32)).astype(np.float32) * 0.3, -1, 1)
        mio.write_image(mio.MedicalImage.from_dhw(v, np.eye(4)), tmp_path / f"v{i}.nii.gz")
    return tmp_path


@pytest.mark.parametrize("cache", [True, False])
def test_stage1_crops_read_each_file_once_with_the_cache(volume_files, monkeypatch, cache):
    calls = []
    real = mdata.load_volume

    def counting(path, cfg):
        calls.append(Path(path).name)
        return real(path, cfg)

    monkeypatch.setattr(mdata, "load_volume", counting)
    cfg = demo_config(
        f"data.root={volume_files}",
        "data.synthetic=false",
        "data.intensity=none",
        f"data.cache_volumes={str(cache).lower()}",
    ).data
    ds = mdata.PatchDataset(mdata.VolumeSource(cfg), cfg.patch, seed=3)
    crops = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        crops += [ds[i] for i in range(len(ds))]
    assert len(calls) == (2 if cache else 6)  # once per file, or once per crop (official)
    # the same crops either way: caching changes the speed, not the data
    monkeypatch.setattr(mdata, "load_volume", real)
    other = demo_config(
        f"data.root={volume_files}",
        "data.synthetic=false",
        "data.intensity=none",
        f"data.cache_volumes={str(not cache).lower()}",
    ).data
    ds2 = mdata.PatchDataset(mdata.VolumeSource(other), other.patch, seed=3)
    again = []
    for epoch in range(3):
        ds2.set_epoch(epoch)
        again += [ds2[i] for i in range(len(ds2))]
    assert all(torch.equal(a, b) for a, b in zip(crops, again))


def test_cached_controlnet_pairs_equal_the_per_step_encoding():
    from meddiffusion3d.train_controlnet import cached_pairs, encode_pair

    cfg = demo_config("data.n_volumes=2")

    def enc(v):
        return F.avg_pool3d(v, 4)[:, :1].repeat(1, 4, 1, 1, 1)

    ds = mdata.WholeVolumeDataset(mdata.VolumeSource(cfg.data), cfg.data, seed=0)
    cache = cached_pairs(ds, cfg, enc, "cpu")
    assert len(cache) == 2
    for i in range(2):
        z0, hint = encode_pair(ds[i][None], cfg, enc)
        assert torch.equal(cache[i][0], z0[0]) and torch.equal(cache[i][1], hint[0])
        assert not torch.equal(z0, hint)  # the hint is the degraded volume's encoding

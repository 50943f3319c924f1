import pytest

from drdm.config import DRDMConfig, load
from medsynth_core.config import ConfigError


def test_packaged_configs_load():
    demo, paper = load("demo"), load("paper")
    assert isinstance(demo, DRDMConfig) and demo.diffusion.img_size == 32 and demo.diffusion.ctl_sz == 16
    assert paper.diffusion.img_size == 256 and paper.train.lr == 1e-4 and paper.diffusion.v_scale == 4e-5
    assert (paper.train.w_dist, paper.train.w_ang, paper.train.w_reg) == (1.0, 1.0, 10.0)


def test_official_cmr_yaml_maps(ref):
    cfg = load(ref / "config_cmr.yaml")
    assert cfg.name == "cmr"
    assert (cfg.model.ndims, cfg.diffusion.img_size, cfg.diffusion.timesteps) == (2, 256, 80)
    assert cfg.diffusion.v_scale == 4e-5 and cfg.diffusion.padding_mode == "zeros"
    assert cfg.diffusion.resample_mode == "bicubic" and cfg.diffusion.img_pad_mode == "zeros"
    assert (cfg.train.batchsize, cfg.train.lr, cfg.train.noise_scale) == (1, 1e-4, 0.1)
    assert (cfg.augment.start_noise_step, cfg.augment.noise_step, cfg.augment.aug_coe) == (48, 2, 32)


def test_official_lct_yaml_maps(ref):
    cfg = load(ref / "config_lct.yaml", ["train.steps=5"])
    assert (cfg.model.ndims, cfg.diffusion.img_size) == (3, 128)
    assert cfg.diffusion.padding_mode == "border" and cfg.diffusion.resample_mode == "bilinear"
    assert (cfg.augment.start_noise_step, cfg.augment.noise_step) == (64, 1)
    assert cfg.train.steps == 5


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="diffusion.v_scal"):
        load("demo", ["diffusion.v_scal=1"])
    bad = tmp_path / "official.yaml"
    bad.write_text("net_name: recresacnet\nimg_size: 64\nfoo: 1\n")
    with pytest.raises(ConfigError, match="foo"):
        load(bad)
    with pytest.raises(ConfigError, match="img_size"):
        load("demo", ["diffusion.img_size=30"])


def test_periodic_intervals():
    """image_every / log_every = 0 mean "at the last step only"; negative values are config errors."""
    load("demo", ["train.image_every=0", "train.log_every=0"])
    with pytest.raises(ConfigError, match="train.image_every"):
        load("demo", ["train.image_every=-1"])

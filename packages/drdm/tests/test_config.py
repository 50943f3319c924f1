import pytest

from drdm.config import DRDMConfig, load
from medsynth_core.config import ConfigError


def test_packaged_configs_load():
    demo, paper = load("demo"), load("paper")
    assert isinstance(demo, DRDMConfig) and demo.diffusion.img_size == 32 and demo.diffusion.ctl_sz == 8
    assert paper.diffusion.img_size == 256 and paper.train.lr == 1e-4 and paper.diffusion.v_scale == 4e-5
    assert (paper.train.w_dist, paper.train.w_ang, paper.train.w_reg) == (1.0, 1.0, 10.0)


def test_official_cmr_yaml_maps(ref):
    cfg = load(ref / "config_cmr.yaml")
    assert cfg.run.name == "cmr"
    assert (cfg.model.ndims, cfg.diffusion.img_size, cfg.diffusion.timesteps) == (2, 256, 80)
    assert cfg.diffusion.v_scale == 4e-5 and cfg.diffusion.padding_mode == "zeros"
    assert cfg.diffusion.resample_mode == "bicubic" and cfg.diffusion.img_pad_mode == "zeros"
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.noise_scale) == (1, 1e-4, 0.1)
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
    load("demo", ["train.sample_every=0", "train.log_every=0"])
    with pytest.raises(ConfigError, match="train.sample_every"):
        load("demo", ["train.sample_every=-1"])


def test_official_cmr_yaml_maps_data_keys(ref):
    """An official YAML selects the official loader's folder and preprocessing (data_name); overrides win."""
    cfg = load(ref / "config_cmr.yaml")
    d = cfg.data
    assert (d.source, d.official, d.root) == ("folder", "cmr", "Data/Src_data/CMR_processed_rmbg_resize")
    assert d.slices and d.preprocessed  # the official '*_resize' folder is used as it is
    raw = load(ref / "config_cmr.yaml", ["data.root=/data/cmr_raw"]).data
    assert raw.root == "/data/cmr_raw" and not raw.preprocessed and raw.remove_background
    lct = load(ref / "config_lct.yaml").data
    assert (lct.root, lct.slices, lct.preprocessed, lct.remove_background) == (
        "Data/Src_data/CTLung_processed",
        False,
        True,
        False,
    )
    assert load(ref / "config_cmr.yaml", ["data.source=phantom"]).data.source == "phantom"  # only when asked


def _official_yaml(tmp_path, name="cmr", size=32):
    p = tmp_path / f"config_{name}.yaml"
    p.write_text(
        f"data_name: {name}\nnet_name: recresacnet\nndims: 2\nimg_size: {size}\nbatchsize: 1\n"
        "timesteps: 80\nv_scale: 4.0e-05\nlr: 0.0001\nepoch: 10\n"
    )
    return p


def test_official_yaml_refuses_unknown_data(tmp_path):
    with pytest.raises(ConfigError, match="data_name 'mydata'.*data.root"):
        load(_official_yaml(tmp_path, "mydata"))
    assert load(_official_yaml(tmp_path, "mydata"), ["data.root=/x"]).data.root == "/x"
    bad = tmp_path / "lct3.yaml"
    bad.write_text("data_name: lct\nnet_name: recresacnet\nndims: 2\nimg_size: 64\n")
    with pytest.raises(ConfigError, match="3D loader but ndims=2"):
        load(bad)


def test_official_yaml_train_never_falls_back_to_phantoms(tmp_path, monkeypatch):
    """Training with an official YAML reads the official folder or says which key to set (no phantoms)."""
    import numpy as np

    from drdm.train import train
    from medsynth_core.io import MedicalIOError, write_image
    from medsynth_core.phantoms import labelled_anatomy

    monkeypatch.chdir(tmp_path)
    yaml = _official_yaml(tmp_path)
    with pytest.raises(
        MedicalIOError, match=r"Data/Src_data/CMR_processed_rmbg_resize.*official cmr.*data.root"
    ):
        train(load(yaml, [f"run.root={tmp_path}", "train.steps=1"]))
    folder = tmp_path / "Data" / "Src_data" / "CMR_processed_rmbg_resize"
    for i in range(2):
        write_image(labelled_anatomy((32, 32), seed=i).image.astype(np.float64), folder / f"s{i}.nii.gz")
    res = train(load(yaml, [f"run.root={tmp_path}", "train.steps=1", "train.sample_every=0"]))
    assert res["step"] == 1 and np.isfinite(res["loss"])


def test_faithful_augment_defaults():
    """label_mode and random_permute default to the official behaviour; the demo config turns the fixes on."""
    from drdm.config import AugmentConfig

    a = AugmentConfig()
    assert a.label_mode == "image" and a.random_permute is True
    paper = load("paper").augment
    assert paper.label_mode == "image" and paper.random_permute is True
    demo = load("demo").augment
    assert demo.label_mode == "nearest" and demo.random_permute is False


def test_dist_eps_key():
    assert load("paper").train.dist_eps == 1e-3
    with pytest.raises(ConfigError, match="train.dist_eps"):
        load("demo", ["train.dist_eps=0"])

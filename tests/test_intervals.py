"""Periodic work (logs, previews, checkpoints) follows one rule in every package: ``medsynth_core.training.due``
(every N steps and always at the last; 0 = last step only). Negative intervals are config errors that name
the key, before any training starts."""

import importlib

import pytest

from medsynth_core.config import ConfigError, bundled_configs, load_config

CASES = [
    ("fda_vae", "train.log_every=-1", "train.log_every"),
    ("drdm", "train.sample_every=-1", "train.sample_every"),
    ("drdm", "train.ckpt_every=-1", "train.ckpt_every"),
    ("mgdcr", "train.sample_every=-1", "train.sample_every"),
    ("mgdcr", "latent.ckpt_every=-1", "latent.ckpt_every"),
    ("uni_coal", "train.ckpt_every=-1", "train.ckpt_every"),
    ("meddiffusion3d", "ae.stage1.sample_every=-1", "sample_every"),
    ("meddiffusion3d", "controlnet.log_every=-1", "ckpt_every"),
]


@pytest.mark.parametrize(("pkg", "override", "key"), CASES)
def test_negative_intervals_are_config_errors(pkg, override, key):
    cfg_mod = importlib.import_module(f"{pkg}.config")
    demo = bundled_configs(cfg_mod.__file__) / "demo.yaml"
    cls = getattr(cfg_mod, "Config", None) or cfg_mod.DRDMConfig
    load_config(cls, demo, [override.replace("-1", "0")])  # 0 is allowed: last step only
    with pytest.raises(ConfigError, match=key):
        load_config(cls, demo, [override])

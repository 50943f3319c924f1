"""--amp as a named mode off | bf16 | fp16 (issue 16): what each mode does, configs, legacy booleans."""

import contextlib

import pytest
import torch

from meddiffusion3d import precision as P
from meddiffusion3d.config import Config, StageConfig, TrainConfig
from medsynth_core.config import ConfigError, load_config


def test_modes_map_to_dtypes_and_scaler_only_for_fp16():
    assert P.autocast_dtype("cuda", "off") is None
    assert P.autocast_dtype("cuda", "bf16") is torch.bfloat16
    assert P.autocast_dtype("cuda:0", "fp16") is torch.float16  # GradScaler exactly here
    for mode in P.MODES:  # fp32 on CPU whatever the mode, so CPU results never change
        assert P.autocast_dtype("cpu", mode) is None
        assert isinstance(P.autocast("cpu", mode), contextlib.nullcontext)
        assert not P.grad_scaler("cpu", mode).is_enabled()
    with pytest.raises(ValueError, match="amp must be one of"):
        P.autocast_dtype("cuda", "fp32")


def test_config_defaults_official_and_legacy_booleans():
    c = Config()
    assert c.train.amp == "fp16"  # train_BiFlowNet_SingleRes.py: fp16 + GradScaler
    assert c.ae.stage1.amp == "off" and c.ae.stage2.amp == "off"  # 8×: fp32
    assert StageConfig(amp=True).amp == "bf16" and StageConfig(amp=False).amp == "off"  # 4×: bf16-mixed
    assert TrainConfig(amp=True).amp == "fp16" and TrainConfig(amp=False).amp == "off"
    assert TrainConfig(amp="bf16").amp == "bf16" and StageConfig(amp="fp16").amp == "fp16"


def test_yaml_and_overrides(tmp_path):
    import meddiffusion3d.config as mc
    from medsynth_core.config import bundled_configs

    paper = bundled_configs(mc.__file__) / "paper.yaml"
    c = load_config(Config, paper, ["train.amp=bf16", "ae.stage1.amp=fp16"])
    assert c.train.amp == "bf16" and c.ae.stage1.amp == "fp16" and c.ae.stage2.amp == "off"
    assert load_config(Config, paper).train.amp == "fp16"
    assert load_config(Config, paper, ["train.amp=off"]).train.amp == "off"  # YAML off (= false) too
    with pytest.raises(ConfigError, match="amp"):
        load_config(Config, paper, ["train.amp=fp32"])


def test_cli_amp_flag_sets_the_stage_or_train_mode(tmp_path, capsys):
    """``train-ae --amp`` sets ``ae.stage<N>.amp`` of the stage being trained, ``train --amp`` sets
    ``train.amp``; the config saved in the checkpoint says so, and a bad mode is a one-line error."""
    from pathlib import Path

    from meddiffusion3d.cli import main
    from meddiffusion3d.train_ae import KIND
    from medsynth_core.checkpoint import CheckpointManager, load_checkpoint

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    base = ["--config", str(demo), f"run.root={tmp_path}", "ae.stage1.steps=1", "ae.stage1.ckpt_every=1"]
    assert main(["train-ae", "--stage", "1", "--amp", "fp16", *base]) == 0
    ck = CheckpointManager(tmp_path / "meddiffusion3d" / "demo" / "stage1" / "checkpoints").latest()
    saved = load_checkpoint(ck, kind=KIND)["config"]
    assert saved["ae"]["stage1"]["amp"] == "fp16" and saved["ae"]["stage2"]["amp"] == "off"
    with pytest.raises(SystemExit) as bad:  # argparse: usage + one error line, exit 2
        main(["train-ae", "--stage", "1", "--amp", "fp32", *base])
    assert bad.value.code == 2 and "argument --amp: invalid choice: 'fp32'" in capsys.readouterr().err
    # `train` takes --amp (it stops at the missing latents, not at argparse) and maps it to train.amp
    assert main(["train", "--amp", "bf16", "--config", str(demo), f"run.root={tmp_path}", "train.latents="]) == 2
    assert "train.latents" in capsys.readouterr().err
    import argparse

    from meddiffusion3d.cli import _load_ae_cfg, _load_train_cfg

    ns = argparse.Namespace(config=str(demo), overrides=["train.amp=off"], amp="bf16")
    assert _load_train_cfg(ns).train.amp == "bf16"  # the flag wins over an override
    assert _load_train_cfg(argparse.Namespace(config=str(demo), overrides=[], amp=None)).train.amp == "off"
    ae = _load_ae_cfg(argparse.Namespace(config=str(demo), overrides=[], amp="bf16", stage=2))
    assert (ae.ae.stage2.amp, ae.ae.stage1.amp) == ("bf16", "off")

"""Train config: train.lr_schedule (constant, the official LambdaLR ≡ 1; cosine, the demo recipe) and bad values."""

from __future__ import annotations

import math

import pytest

from fda_vae.config import Config
from fda_vae.train import Trainer
from medsynth_core.config import ConfigError, load_config

from .conftest import PKG, tiny_overrides


def _lrs(t: Trainer) -> list[float]:
    return [g["lr"] for o in (t.opt_g, *t.opt_d.values()) for g in o.param_groups]


def test_constant_is_the_official_schedule(tmp_path):
    cfg = load_config(Config, PKG / "configs" / "paper.yaml", [f"run.root={tmp_path}"])
    assert cfg.train.lr_schedule == "constant"
    t = Trainer(load_config(Config, PKG / "configs" / "demo.yaml", [*tiny_overrides(tmp_path), "train.lr_schedule=constant"]))
    before = _lrs(t)
    for step in (0, 3, 9):
        assert t.set_lr(step, 10) == 1.0
    assert _lrs(t) == before


@pytest.mark.parametrize("horizon", [0, 20])
def test_cosine_anneals_g_and_both_d_to_zero(tmp_path, horizon):
    cfg = load_config(
        Config,
        PKG / "configs" / "demo.yaml",
        [*tiny_overrides(tmp_path), "train.lr_schedule=cosine", f"train.lr_decay_steps={horizon}"],
    )
    t = Trainer(cfg)
    total = 10
    h = horizon or total
    for step in (0, 5, 10):
        f = t.set_lr(step, total)
        assert f == pytest.approx(0.5 * (1 + math.cos(math.pi * step / h)))
        assert t.opt_g.param_groups[0]["lr"] == pytest.approx(cfg.train.lr_g * f)
        assert all(o.param_groups[0]["lr"] == pytest.approx(cfg.train.lr_d * f) for o in t.opt_d.values())
    assert t.set_lr(h, total) == pytest.approx(0.0, abs=1e-12)


def test_bad_schedule_values(tmp_path):
    with pytest.raises(ConfigError, match="lr_schedule"):
        load_config(Config, PKG / "configs" / "demo.yaml", [*tiny_overrides(tmp_path), "train.lr_schedule=step"])
    with pytest.raises(ConfigError, match="lr_decay_steps"):
        load_config(Config, PKG / "configs" / "demo.yaml", [*tiny_overrides(tmp_path), "train.lr_decay_steps=-1"])


@pytest.mark.parametrize(
    "override, key",
    [("train.steps=-5", "train.steps"), ("data.phantom_phases=[foo,venous]", "data.phantom_phases"),
     ("data.phantom_phases=[venous,venous]", "data.phantom_phases")],
)
def test_bad_run_values_exit_2_naming_the_key(tmp_path, capsys, override, key):
    """Issue 18: max_steps=-5 used to fall back to epochs (12,008 steps); a bad phase ended in a traceback."""
    from fda_vae.cli import main

    assert main(["train", "--config", str(PKG / "configs" / "demo.yaml"), f"run.root={tmp_path}", override]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "fda-vae").exists()

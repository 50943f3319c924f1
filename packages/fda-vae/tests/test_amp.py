"""AMP switch (issue 12): run.amp / --amp {off,bf16,fp16}; CUDA-only, so CPU results never change."""

from __future__ import annotations

import pytest
import torch

from fda_vae.amp import autocast, grad_scaler, resolve_amp
from fda_vae.cli import PROG, VERBS, amp_override, main
from fda_vae.config import Config
from fda_vae.train import Trainer
from medsynth_core.cli import UserError, build_parser
from medsynth_core.config import ConfigError, load_config

from .conftest import PKG, tiny_overrides, toy_pairs

DEMO = str(PKG / "configs" / "demo.yaml")


def _run(cfg: Config, steps: int = 3) -> tuple[list[dict[str, float]], dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    a, b = toy_pairs(8, 16)
    t = Trainer(cfg)
    logs = []
    for i in range(steps):
        idx = [(2 * i) % 8, (2 * i + 1) % 8]
        batch = {
            "a": torch.from_numpy(a[idx] * 2 - 1)[:, None],
            "b": torch.from_numpy(b[idx] * 2 - 1)[:, None],
        }
        logs.append(t.step(batch))
    state = {f"{m}.{k}": v.clone() for m, mod in t.models().items() for k, v in mod.state_dict().items()}
    return logs, state, t.checkpoint(steps, 0, 0.0)["extra"]


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_amp_is_ignored_on_cpu_bit_exactly(tmp_path, mode, caplog):
    caplog.set_level("INFO", logger="fda_vae")
    off = load_config(Config, DEMO, [*tiny_overrides(tmp_path), "run.device=cpu"])
    on = load_config(Config, DEMO, [*tiny_overrides(tmp_path), "run.device=cpu", f"run.amp={mode}"])
    assert (off.run.amp, on.run.amp) == ("off", mode)
    logs_off, state_off, extra_off = _run(off)
    logs_on, state_on, extra_on = _run(on)
    assert logs_on == logs_off and all(v["skipped"] == 0.0 for v in logs_on)
    assert state_on.keys() == state_off.keys()
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_off)
    assert "grad_scaler" not in extra_on and extra_on == extra_off
    assert any(f"run.amp={mode} ignored on cpu" in r.getMessage() for r in caplog.records)


def test_amp_helpers_on_cpu():
    assert resolve_amp("bf16", "cpu") == resolve_amp("fp16", "cpu") == "off"
    x = torch.randn(4, 4)
    with autocast(resolve_amp("bf16", "cpu"), "cpu"):
        assert (x @ x).dtype == torch.float32
    scaler = grad_scaler("off")
    loss = (x**2).sum()
    assert not scaler.is_enabled() and scaler.scale(loss) is loss
    with pytest.raises(UserError, match="off, bf16, fp16"):
        resolve_amp("fp32", "cpu")


def test_amp_option_parses(tmp_path):
    parser = build_parser(PROG, "", VERBS)
    args = parser.parse_args(["train", "--config", DEMO, "--amp", "bf16", "train.steps=2"])
    assert args.amp == "bf16" and args.overrides == ["train.steps=2"] and amp_override(args) == ["run.amp=bf16"]
    args = parser.parse_args(["train", "--config", DEMO])
    assert args.amp is None and amp_override(args) == []  # the config decides (default off)
    for verb in (
        ["synthesize", "--checkpoint", "c", "--input", "i", "--output", "o"],
        ["evaluate", "--checkpoint", "c", "--out", "o"],
    ):
        assert parser.parse_args(verb).amp == "off"
        assert parser.parse_args([*verb, "--amp", "fp16"]).amp == "fp16"
    # the config key: off / bf16 / fp16; YAML's bare `off` (false) means off
    for value, want in (("off", "off"), ("bf16", "bf16"), ("fp16", "fp16"), ("false", "off")):
        assert load_config(Config, DEMO, [f"run.amp={value}"]).run.amp == want


def test_amp_invalid_value_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", DEMO, "--amp", "fp32"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--amp" in err and "invalid choice" in err and "fp32" in err and "bf16" in err
    # the config key: refused before anything runs, one line naming the key
    assert main(["train", "--config", DEMO, f"run.root={tmp_path}", "run.amp=fp32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run.amp" in err and "off, bf16 or fp16" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="run.amp"):
        load_config(Config, DEMO, ["run.amp=true"])


def test_autocast_code_path_runs_under_cpu_bf16(tmp_path, monkeypatch):
    """The autocast regions of the trainer (no GPU here): CPU bf16 autocast stands in for CUDA's, so the
    mixed-dtype step, validation and preview run, stay finite, and really compute in bf16."""
    import fda_vae.train as train_mod

    monkeypatch.setattr(train_mod, "resolve_amp", lambda mode, device: mode)
    monkeypatch.setattr(
        train_mod,
        "autocast",
        lambda mode, device: torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "off"),
    )
    cfg = load_config(Config, DEMO, [*tiny_overrides(tmp_path), "run.device=cpu", "run.amp=bf16"])
    logs, state, _ = _run(cfg, steps=2)
    assert all(torch.isfinite(torch.tensor(list(v.values()))).all() for v in logs)
    logs_off, state_off, _ = _run(load_config(Config, DEMO, [*tiny_overrides(tmp_path), "run.device=cpu"]), 2)
    assert logs[0]["trans"] != logs_off[0]["trans"]  # bf16 arithmetic happened
    assert abs(logs[0]["trans"] - logs_off[0]["trans"]) < 0.05 * logs_off[0]["trans"]
    assert all(v.dtype == state_off[k].dtype for k, v in state.items())  # weights stay fp32
    t = Trainer(cfg)
    a, b = toy_pairs(2, 16)
    ds = [
        {"a": torch.from_numpy(a[i] * 2 - 1)[None], "b": torch.from_numpy(b[i] * 2 - 1)[None]}
        for i in range(2)
    ]
    val = t.validate(ds, 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in val.values())
    assert t.save_samples(ds, tmp_path / "grid.png").is_file()

import json
import os
from pathlib import Path

import pytest
import torch

from medsynth_core.atomic import atomic_output, atomic_write_text
from medsynth_core.bench import BenchCase, peak_rss_mb, run_case
from medsynth_core.cli import EXIT_NOT_IMPLEMENTED, EXIT_USER_ERROR, UserError, Verb, not_implemented, run_cli
from medsynth_core.config import ConfigError


def test_atomic_output_keeps_extension_and_cleans_up(tmp_path):
    dest = tmp_path / "sub" / "vol.nii.gz"
    with atomic_output(dest) as tmp:
        assert tmp.name == "vol.nii.gz" and tmp.parent.parent == dest.parent
        tmp.write_bytes(b"abc")
    assert dest.read_bytes() == b"abc"
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert dest.read_bytes() == b"abc"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["vol.nii.gz"]
    atomic_write_text(dest, "x")
    assert dest.read_text() == "x"


def test_cli_dispatch_and_user_errors(capsys):
    calls = []

    def ok(args):
        calls.append(args.n)

    def bad_config(args):
        raise ConfigError("c.yaml: unknown key 'x'")

    def bad_input(args):
        raise UserError("/data/a.nii.gz: NaN found")

    verbs = [
        Verb("ok", "fine", ok, lambda p: p.add_argument("--n", type=int, default=1)),
        Verb("cfg", "bad config", bad_config),
        Verb("inp", "bad input", bad_input),
        Verb("todo", "later", not_implemented("tool", "#9")),
    ]
    assert run_cli("tool", "test", verbs, ["ok", "--n", "4"]) == 0 and calls == [4]
    assert run_cli("tool", "test", verbs, ["cfg"]) == EXIT_USER_ERROR
    assert "tool cfg: error: c.yaml: unknown key 'x'" in capsys.readouterr().err
    assert run_cli("tool", "test", verbs, ["inp"]) == EXIT_USER_ERROR
    assert run_cli("tool", "test", verbs, ["todo"]) == EXIT_NOT_IMPLEMENTED
    assert "not implemented yet (tracked in issue #9)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli("tool", "test", verbs, ["nope"])


def test_bench_case_measures_train_and_infer():
    def setup(device):
        model = torch.nn.Linear(64, 64).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(16, 64, device=device)

        def step():
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

        def infer():
            with torch.no_grad():
                model(x)

        return {"train_step": step, "infer": infer, "batch_size": 16, "params": 64 * 65}

    r = run_case(BenchCase("lin", setup), torch.device("cpu"), warmup=1, repeats=2)
    assert r["train_step_s"] > 0 and r["infer_latency_s"] > 0
    assert r["train_samples_per_s"] == pytest.approx(16 / r["train_step_s"])
    assert r["params"] == 4160 and r["peak_rss_mb"] > 10
    json.dumps(r)  # report must be JSON-serialisable
    assert peak_rss_mb() > 0


def test_core_names_no_method():
    src = Path(__file__).resolve().parents[1] / "src" / "medsynth_core"
    banned = ["fda", "drdm", "mgdcr", "uni-coal", "unicoal", "uni_coal", "meddiffusion", "biflownet", "diffae"]
    for f in src.rglob("*.py"):
        text = f.read_text(encoding="utf-8").lower()
        for word in banned:
            assert word not in text, f"{f.name} mentions '{word}': medsynth-core must not know any method"


# ------------------------------------------------------------------------------------- output paths


def test_check_output_path_refuses_files_in_the_way(tmp_path):
    """Issue 18: an output that is an existing file (or under one) is one line naming it, before any work,
    and nothing is created."""
    from medsynth_core.atomic import check_output_path
    from medsynth_core.errors import OutputPathError

    blocker = tmp_path / "taken"
    blocker.write_text("x")
    assert check_output_path(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output_path(tmp_path / "out.nii.gz", folder=False) == tmp_path / "out.nii.gz"
    with pytest.raises(OutputPathError, match="taken: output folder is an existing file, not a folder"):
        check_output_path(blocker)
    with pytest.raises(OutputPathError, match=r"sub: output folder cannot be created because .*taken is a file"):
        check_output_path(blocker / "sub")
    with pytest.raises(OutputPathError, match=r"a\.nii\.gz: output file cannot be created because"):
        check_output_path(blocker / "a.nii.gz", folder=False, what="output file")
    with pytest.raises(OutputPathError, match="is an existing folder, not a file"):
        check_output_path(tmp_path, folder=False)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_check_output_path_refuses_unwritable(tmp_path):
    from medsynth_core.atomic import check_output_path
    from medsynth_core.errors import OutputPathError

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="permission denied"):
            check_output_path(locked / "run")
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_path(locked)
    finally:
        locked.chmod(0o700)


def test_rundir_and_cli_give_one_line_for_bad_output(tmp_path, capsys):
    from medsynth_core.cli import Verb, run_cli
    from medsynth_core.training import RunDir

    blocker = tmp_path / "runs"
    blocker.write_text("x")

    def train(args):
        RunDir.create(blocker, "pkg", "demo")

    def write(args):
        (blocker / "x.txt").write_text("y")  # an OS error the package did not foresee: still one line

    verbs = [Verb("train", "t", train), Verb("write", "w", write)]
    assert run_cli("pkg", "d", verbs, ["train"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pkg train: error:" in err and "run folder cannot be created" in err
    assert run_cli("pkg", "d", verbs, ["write"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pkg write: error:" in err and "x.txt" in err
    assert blocker.read_text() == "x"


def test_emit_prints_human_lines_or_json(capsys):
    """Issue 17: a verb's result is human ``key: value`` lines (nested keys dotted, floats 6 digits), or one JSON
    document with --json; ``say`` lines appear only without --json; every verb accepts --json."""
    import argparse
    import json

    from medsynth_core.cli import Verb, build_parser, emit, say

    result = {"psnr": 31.234567891, "run": {"dir": "runs/x", "steps": [1, 2]}, "rows": [{"a": 1}], "none": None}
    emit(argparse.Namespace(json=False), result)
    say(argparse.Namespace(json=False), "written: x")
    out = capsys.readouterr().out.splitlines()
    assert out == ["psnr: 31.2346", "run.dir: runs/x", "run.steps: [1, 2]", "rows[0].a: 1", "none: -", "written: x"]
    emit(argparse.Namespace(json=True), result)
    say(argparse.Namespace(json=True), "written: x")
    assert json.loads(capsys.readouterr().out) == result
    parser = build_parser("p", "d", [Verb("v", "help", lambda a: 0)])
    assert parser.parse_args(["v", "--json"]).json and not parser.parse_args(["v"]).json


def test_shared_train_and_summary_verbs(tmp_path, capsys):
    """Issue 17: train and summary are defined once in core (same options and help in every package): train
    loads the config, calls the package's function with the parsed args, prints the (reported) result and
    exits 143 with one line when the run was preempted; summary prints summarise(cfg); config_loader reads
    a path or a bundled name and appends extra overrides."""
    import json
    from dataclasses import dataclass

    from medsynth_core.cli import HELP, config_loader, run_cli, summary_verb, train_verb

    @dataclass
    class Cfg:
        steps: int = 1
        amp: str = "off"

    calls = []

    def load(args):
        return Cfg(steps=int(args.overrides[0].split("=")[1]) if args.overrides else 1)

    def train(cfg, args):
        calls.append((cfg.steps, args.resume, args.extra))
        return {"step": cfg.steps, "preempted": "SIGTERM" if cfg.steps == 9 else None}

    verbs = [
        train_verb("p", load, train, add_arguments=lambda ap: ap.add_argument("--extra", default="x"),
                   report=lambda r: {"step": r["step"]}),  # fmt: skip
        summary_verb(load, lambda cfg: {"steps": cfg.steps}),
    ]
    assert run_cli("p", "d", verbs, ["train", "--json", "--config", "c", "steps=3", "--resume", "r.pt"]) == 0
    assert calls == [(3, "r.pt", "x")] and json.loads(capsys.readouterr().out) == {"step": 3}
    assert run_cli("p", "d", verbs, ["train", "--config", "c", "steps=9"]) == 143
    out, err = capsys.readouterr()
    assert out.strip() == "step: 9" and "stopped by SIGTERM after step 9" in err
    assert run_cli("p", "d", verbs, ["summary", "--config", "c", "steps=4"]) == 0
    assert capsys.readouterr().out.strip() == "steps: 4"
    assert verbs[0].help == HELP["train"] and verbs[1].help == HELP["summary"]

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("steps: 5\n")
    pkg_file = tmp_path / "src" / "pkg" / "cli.py"  # bundled configs sit at <package>/configs
    pkg_file.parent.mkdir(parents=True)
    import argparse

    loader = config_loader("medsynth_core.testing_cfg:Cfg", str(pkg_file), lambda a: ["amp=bf16"])
    import sys
    import types

    mod = types.ModuleType("medsynth_core.testing_cfg")
    mod.Cfg = Cfg
    sys.modules["medsynth_core.testing_cfg"] = mod
    try:
        cfg = loader(argparse.Namespace(config="demo", overrides=["steps=6"]))
    finally:
        del sys.modules["medsynth_core.testing_cfg"]
    assert (cfg.steps, cfg.amp) == (6, "bf16")

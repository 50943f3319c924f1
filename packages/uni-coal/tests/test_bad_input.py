"""Bad input (issue 18): convert-official reads official files without unpickling code; bad train counts exit 2."""

from __future__ import annotations

import fractions

import torch

from uni_coal.cli import main


def test_convert_official_refuses_pickled_code(tmp_path, capsys):
    src = tmp_path / "official.pt"
    # fractions.Fraction stands in for any class beyond tensors that unpickling would construct
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": fractions.Fraction(1, 3)}, src)
    assert main(["convert-official", str(src), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "Fraction" in err and "--trust-pickle" in err and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()
    # trusted: the file is unpickled (with a warning) and then judged on its content, still one line
    assert main(["convert-official", str(src), str(tmp_path / "out.pt"), "--trust-pickle"]) in (0, 2)
    assert "Traceback" not in capsys.readouterr().err


def test_bad_train_counts_exit_2(tmp_path, capsys):
    """Issue 18: batch_size=0 ended in ZeroDivisionError, max_steps=-3 trained 0 steps and exited 0."""
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    for override, key in (("train.batch_size=0", "train.batch_size"), ("train.max_steps=-3", "train.max_steps")):
        assert main(["train", "--config", str(demo), f"run_root={tmp_path}", override]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err

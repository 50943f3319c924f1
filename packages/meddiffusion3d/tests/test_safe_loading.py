"""convert-official reads official files without unpickling code (issue 18); --trust-pickle is explicit."""

from __future__ import annotations

import fractions

import torch

from meddiffusion3d.cli import main


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

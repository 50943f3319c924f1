"""Bad input (issue 18): convert-official reads official files without unpickling code; bad train counts exit 2."""

from __future__ import annotations

import fractions

import pytest
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
    for override, key in (("train.batch_size=0", "train.batch_size"), ("train.steps=-3", "train.steps")):
        assert main(["train", "--config", str(demo), f"run.root={tmp_path}", override]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err


def test_truncated_nifti_refused_not_zero_filled(tmp_path):
    """Issue 18: SimpleITK read a .nii.gz cut short (or with a flipped byte) and filled the missing voxels
    with zeros, so synthesize wrote an output without a warning; the readers now refuse it in one line."""
    from medsynth_core.io import MedicalIOError
    from medsynth_core.testing import bad_image_files
    from uni_coal.data import read_lps_array
    from uni_coal.prepare import read_image

    files = bad_image_files(tmp_path)
    for case in ("no_trailer", "flipped_byte", "cut_plain"):
        for reader in (read_lps_array, read_image):
            with pytest.raises(MedicalIOError, match=f"{files[case].name}: file is"):
                reader(files[case])

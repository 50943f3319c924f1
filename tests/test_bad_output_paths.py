"""Issue 18, output paths: an output that is an existing file (or lies under one) exits 2 with one line
naming it, before any work, for every package's train verb and the inference/evaluation verbs that check
their output first; the file in the way is left as it was."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _main(package: str):
    return importlib.import_module(f"{package}.cli").main


TRAIN = {  # package module, prog, demo config, the key of the runs root
    "fda_vae": ("fda-vae", "run.root", "train.steps=1"),
    "drdm": ("drdm", "run.root", "train.steps=1"),
    "mgdcr": ("mgdcr", "run.root", "train.steps=1"),
    "uni_coal": ("uni-coal", "run.root", "train.steps=1"),
}


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "taken"
    path.write_text("keep me")
    return path


def _one_line(capsys, prog: str, verb: str, path) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog} {verb}: error: {path}") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("module", sorted(TRAIN))
def test_train_run_root_is_a_file(module, blocker, capsys):
    prog, key, steps = TRAIN[module]
    cfg = REPO / "packages" / prog / "configs" / "demo.yaml"
    rc = _main(module)(["train", "--config", str(cfg), f"{key}={blocker}", steps])
    assert rc == 2
    err = _one_line(capsys, prog, "train", blocker)
    assert f"because {blocker} is a file, not a folder" in err
    assert blocker.read_text() == "keep me"


def test_drdm_augment_and_evaluate_out_is_a_file(blocker, tmp_path, capsys):
    main = _main("drdm")
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--out", str(blocker)]
    assert main(["augment", "--images", str(tmp_path), *args]) == 2
    assert "--out is an existing file, not a folder" in _one_line(capsys, "drdm", "augment", blocker)
    assert main(["evaluate", *args]) == 2
    assert "--out is an existing file" in _one_line(capsys, "drdm", "evaluate", blocker)
    assert blocker.read_text() == "keep me"


def test_fda_vae_outputs_are_checked_first(blocker, tmp_path, capsys):
    from medsynth_core.io import write_image

    main = _main("fda_vae")
    src = write_image(np.zeros((8, 8), np.float32), tmp_path / "in.nii.gz")
    missing = str(tmp_path / "none.pt")  # the output is refused before the checkpoint is even opened
    assert main(["synthesize", "--checkpoint", missing, "--input", str(src), "--output", str(blocker / "o.nii.gz")]) == 2
    assert "cannot be created because" in _one_line(capsys, "fda-vae", "synthesize", blocker / "o.nii.gz")
    assert main(["synthesize", "--checkpoint", missing, "--input", str(tmp_path), "--output", str(blocker)]) == 2
    assert "--output is an existing file, not a folder" in _one_line(capsys, "fda-vae", "synthesize", blocker)
    assert main(["evaluate", "--checkpoint", missing, "--out", str(blocker)]) == 2
    assert "--out is an existing file" in _one_line(capsys, "fda-vae", "evaluate", blocker)
    assert main(["prepare", str(tmp_path), str(blocker)]) == 2
    assert "output root is an existing file" in _one_line(capsys, "fda-vae", "prepare", blocker)
    assert blocker.read_text() == "keep me"


def test_uni_coal_mgdcr_md3d_outputs_are_checked_first(blocker, tmp_path, capsys):
    """uni-coal synthesize, mgdcr encode/reconstruct, meddiffusion3d encode/decode: the output is refused
    before the checkpoint is opened (a missing checkpoint would be the other error)."""
    from medsynth_core.io import write_image

    src = write_image(np.zeros((8, 8, 4), np.float32), tmp_path / "in.nii.gz")
    missing = str(tmp_path / "none.pt")
    uc = _main("uni_coal")
    args = ["--checkpoint", missing, "--input", str(src), "--target", "PD", "--output"]
    assert uc(["synthesize", *args, str(blocker / "o.nii.gz")]) == 2
    assert "cannot be created because" in _one_line(capsys, "uni-coal", "synthesize", blocker / "o.nii.gz")
    assert uc(["synthesize", *args, str(tmp_path)]) == 2
    assert "--output is an existing folder, not a file" in _one_line(capsys, "uni-coal", "synthesize", tmp_path)
    mg = _main("mgdcr")
    assert mg(["reconstruct", "--checkpoint", missing, "--sax", str(src), "--lax", str(src), "--out", str(blocker)]) == 2
    assert "--out is an existing file, not a folder" in _one_line(capsys, "mgdcr", "reconstruct", blocker)
    assert mg(["encode", "--checkpoint", missing, "--input", str(src), "--out", str(blocker / "lat.pt")]) == 2
    assert "cannot be created because" in _one_line(capsys, "mgdcr", "encode", blocker / "lat.pt")
    md = _main("meddiffusion3d")
    for verb in ("encode", "decode"):
        assert md([verb, "--checkpoint", missing, "--input", str(src), "--out", str(blocker)]) == 2
        assert "--out is an existing file, not a folder" in _one_line(capsys, "meddiffusion3d", verb, blocker)
    assert blocker.read_text() == "keep me"

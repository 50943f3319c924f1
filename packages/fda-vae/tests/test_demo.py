"""``fda-vae demo`` at micro size (seconds): the files of ``../shared/LEARNING.md``, resume, no network/CUDA.

The full recipe and its margins are ``test_learns.py``; this checks the plumbing with 4 training steps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fda_vae.demo import run_demo
from medsynth_core.heldout import rescore
from medsynth_core.io import read_image

MICRO = [
    "train.steps=4",
    "train.ckpt_every=2",
    "train.val_every=2",
    "train.sample_every=2",
    "data.image_size=16",
    "data.phantom_train=4",
    "data.phantom_val=2",
]


def test_demo_micro_writes_the_learning_files(tmp_path, monkeypatch):
    """Spec §7 item 9: no CUDA, no xformers, no network, no pretrained weights."""
    import socket

    def no_network(*a, **k):
        raise AssertionError("the demo tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    res = run_demo(tmp_path, MICRO, heldout_cases=3)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["train"]["resumed_at"] == 2 and m["train"]["steps"] == 4
    assert m["phases"] == ["arterial", "venous"] and set(m["heldout"]) == {"a_to_b", "b_to_a"}
    for task, src in (("a_to_b", "arterial"), ("b_to_a", "venous")):
        block = m["heldout"][task]
        assert block["cases"] == 3 and set(block["baselines"]) == {"copy_source", "oracle_linear"}
        assert block["source"] == src and np.isfinite(block["sampled"]["psnr_db"])
        assert (tmp_path / "heldout" / task / "case02" / f"input_{src}.nii.gz").is_file()
        # copy_source is the source itself: its score equals PSNR(source, target) recomputed here
        case = tmp_path / "heldout" / task / "case00"
        x = read_image(case / f"input_{src}.nii.gz").array
        y = read_image(case / "target.nii.gz").array
        mse = float(np.mean((x.astype(np.float64) - y) ** 2))
        assert block["per_case"]["case00"]["baselines"]["copy_source"]["psnr_db"] == pytest.approx(
            10 * np.log10(1 / mse), abs=1e-4
        )
    assert rescore(tmp_path / "heldout")["b_to_a"]["method"] == pytest.approx(m["heldout"]["b_to_a"]["method"], abs=1e-4)
    assert res["a_to_b"]["ours"] == pytest.approx(m["heldout"]["a_to_b"]["method"])
    assert (tmp_path / "figure.png").is_file()
    assert read_image(m["synthesized_nifti"]).array.shape == (16, 16)
    # a second demo into the same folder starts fresh (no stale held-out cases)
    run_demo(tmp_path, MICRO, heldout_cases=2)
    assert not (tmp_path / "heldout" / "a_to_b" / "case02").exists()


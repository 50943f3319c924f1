"""Safe loading of official checkpoints (issue 18): weights_only with a small allow-list, else refuse."""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytest
import torch

from medsynth_core.checkpoint import CheckpointError, load_official_file


class Payload:  # an arbitrary class: unpickling it would run this module's code
    def __init__(self, v):
        self.v = v


def test_tensors_namespace_and_numpy_scalars_load(tmp_path):
    obj = {
        "state_dict": {"w": torch.arange(3.0)},
        "args": argparse.Namespace(lr=1e-4, name="x"),
        "best": np.float64(0.5),
        "hist": np.arange(3),
    }
    torch.save(obj, tmp_path / "a.pt")
    got = load_official_file(tmp_path / "a.pt")
    assert torch.equal(got["state_dict"]["w"], torch.arange(3.0))
    assert got["args"].lr == 1e-4 and got["best"] == 0.5 and list(got["hist"]) == [0, 1, 2]


def test_foreign_objects_are_refused_unless_trusted(tmp_path):
    torch.save({"w": torch.ones(1), "extra": Payload(3)}, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match=r"Payload.*--trust-pickle"):
        load_official_file(tmp_path / "b.pt")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = load_official_file(tmp_path / "b.pt", trust_pickle=True)
    assert got["extra"].v == 3 and any("full pickle" in str(x.message) for x in w)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_official_file(tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot be read|beyond tensors"):
        load_official_file(tmp_path / "bad.pt")

"""Recipe flags of the demo (issue 13): train.lr_schedule / train.warmup_steps and data.phantom_texture, each
default (the spec's / official behaviour) and its alternative."""

from pathlib import Path

import numpy as np
import pytest
import torch

from drdm.config import load
from drdm.data import build_dataset
from drdm.demo import heldout_images
from drdm.infer import load_network
from drdm.train import lr_at, train
from medsynth_core.checkpoint import load_checkpoint
from medsynth_core.phantoms import labelled_anatomy


def test_lr_schedule_values():
    const = load("paper", ["data.source=phantom", "data.root="]).train
    assert const.lr_schedule == "constant" and const.warmup_steps == 0
    assert {lr_at(const, s) for s in (0, 10, const.steps - 1)} == {const.lr}
    c = load(
        "paper", ["data.source=phantom", "data.root=", "train.lr_schedule=cosine", "train.warmup_steps=10"]
    ).train
    assert lr_at(c, 0) == pytest.approx(c.lr / 10) and lr_at(c, 9) == pytest.approx(c.lr)
    assert lr_at(c, 10) == pytest.approx(c.lr)
    mid = 10 + (c.steps - 10) // 2
    assert lr_at(c, mid) == pytest.approx(c.lr / 2, rel=1e-2)
    assert lr_at(c, c.steps - 1) < 0.001 * c.lr
    with pytest.raises(Exception, match="train.lr_schedule"):
        load("paper", ["data.source=phantom", "data.root=", "train.lr_schedule=step"])


def _cfg(tmp_path, name, *extra):
    return load(
        "demo",
        [f"run.root={tmp_path}", f"run.name={name}", "train.steps=4", "train.ckpt_every=2", "train.sample_every=100",
         "data.phantom_count=4", "train.batch_size=2", *extra],
    )  # fmt: skip


def test_cosine_schedule_changes_training_and_resumes_exactly(tmp_path):
    const = train(_cfg(tmp_path, "const"))
    cos = _cfg(tmp_path, "cos", "train.lr_schedule=cosine", "train.warmup_steps=1")
    straight = train(cos)
    half = _cfg(tmp_path, "cos_half", "train.lr_schedule=cosine", "train.warmup_steps=1")
    train(half, max_steps=2)
    resumed = train(half)

    def weights(res):
        return load_checkpoint(Path(res["run_dir"]) / "checkpoints" / "step_00000004.pt", kind="drdm")[
            "models"
        ]["network"]

    a, b, c = weights(straight), weights(resumed), weights(const)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the schedule depends on the step alone
    assert not torch.equal(a["conv_out.weight"], c["conv_out.weight"])


def test_phantom_texture_flag():
    assert (
        load("paper", ["data.source=phantom", "data.root="]).data.phantom_texture == 0.0
    )  # spec default: flat tissue
    assert load("demo").data.phantom_texture == 0.3  # the demo recipe (README)
    flat = load("demo", ["data.phantom_count=3", "data.phantom_texture=0"])
    ds = build_dataset(flat)
    assert np.array_equal(ds[1][0].numpy(), labelled_anatomy((32, 32), n_labels=3, seed=1).image)
    tex = load("demo", ["data.phantom_count=3", "data.phantom_texture=0.08"])  # the family, any amplitude
    ds_t = build_dataset(tex)
    ref = labelled_anatomy((32, 32), n_labels=3, seed=1, texture=0.08).image
    assert np.array_equal(ds_t[1][0].numpy(), ref) and not np.array_equal(ref, ds[1][0].numpy())
    # the held-out phantoms are the training family with unseen seeds
    h = heldout_images(tex, 2)
    assert np.array_equal(h[0].image, labelled_anatomy((32, 32), n_labels=3, seed=10_000, texture=0.08).image)


def test_texture_key_survives_the_checkpoint(tmp_path):
    res = train(_cfg(tmp_path, "tex", "train.steps=1", "data.phantom_texture=0.08"))
    _, cfg = load_network(Path(res["run_dir"]) / "checkpoints" / "step_00000001.pt")
    assert cfg.data.phantom_texture == 0.08

"""Issue 19, ``run.channels_last``: every package's train verb runs with the networks' convolution weights in
the channels-last layout (``on``; ``auto`` turns it on for CUDA only, so CPU runs stay bit-identical to the
default), and its first logged losses (same seed, weights not yet updated) equal the default layout's up to
the order of float sums."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TRAIN = {  # package module: (folder, train verb args, keys that make one logged step)
    "fda_vae": ("fda-vae", ["train"], ["train.steps=1", "train.log_every=1"]),
    "drdm": ("drdm", ["train"], ["train.steps=1", "train.log_every=1"]),
    "mgdcr": ("mgdcr", ["train"], ["train.steps=1", "train.log_every=1"]),
    "uni_coal": ("uni-coal", ["train"], ["train.steps=1", "train.log_every=1"]),
    "meddiffusion3d": ("meddiffusion3d", ["train-ae", "--stage", "1"], ["ae.stage1.steps=1", "ae.stage1.log_every=1"]),
}
TIMING = ("time", "sec", "lr", "it_s", "samples_s")


def _first_row(root: Path) -> dict[str, float]:
    rows = [json.loads(x) for f in sorted(root.rglob("metrics.jsonl")) for x in f.read_text().splitlines() if x]
    rows = [r for r in rows if r.get("split") not in ("val", "eval", "test")]  # train (md3d: stage1)
    assert rows, f"no training metrics under {root}"
    return {k: v for k, v in rows[0].items()
            if isinstance(v, float) and not any(t in k for t in TIMING) and math.isfinite(v)}  # fmt: skip


def _laid_out(ckpts: list[Path]) -> bool:
    """Whether the conv weights the checkpoint stores (as the live parameters were) are channels-last."""
    import torch

    ck = torch.load(sorted(ckpts)[-1], map_location="cpu", weights_only=False)
    convs = [t for sd in ck["models"].values() for t in sd.values() if torch.is_tensor(t) and t.ndim in (4, 5)
             and t.shape[1] > 1 and t.shape[2:].numel() > 1]  # fmt: skip
    assert convs, "no convolution weights in the checkpoint"
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}
    return all(t.is_contiguous(memory_format=fmt[t.ndim]) and not t.is_contiguous() for t in convs)


@pytest.mark.parametrize("module", sorted(TRAIN))
def test_channels_last_trains_like_the_default_layout(module, tmp_path):
    folder, verb, steps = TRAIN[module]
    main = importlib.import_module(f"{module}.cli").main
    cfg = REPO / "packages" / folder / "configs" / "demo.yaml"
    first = {}
    for layout in ("off", "on"):
        root = tmp_path / layout
        rc = main([*verb, "--config", str(cfg), f"run.root={root}", f"run.channels_last={layout}", *steps])
        assert rc in (0, None), f"{folder} train with run.channels_last={layout} exited {rc}"
        ckpts = list(root.rglob("*.pt"))
        assert ckpts, f"no checkpoint under {root}"
        first[layout] = _first_row(root)
        assert _laid_out(ckpts) == (layout == "on"), f"{folder}: checkpoint weights in the wrong layout"
    assert len(first["off"]) >= 1, "no loss logged"
    assert first["on"].keys() == first["off"].keys()
    for k, v in first["off"].items():
        assert first["on"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k

"""Shared helpers of the meddiffusion3d autoencoder tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

PKG = Path(__file__).resolve().parents[1]
REF = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "meddiffusion3d"
DEMO = PKG / "configs" / "demo.yaml"
PAPER = PKG / "configs" / "paper.yaml"

# BiFlowNet at the spec §8 demo sizes
BIFLOW_DEMO = dict(
    channels=4,
    dim=12,
    dim_mults=(1, 1, 2),
    use_attn=(0, 0, 1),
    attn_heads=2,
    resnet_groups=4,
    dit_heads=2,
    sub_volume=4,
    dit_patch=1,
    num_mid_dit=1,
    classes=2,
    res_condition=True,
)
# the paper's structure (5 levels, attention at the two deepest, 8³ sub-volumes) at a CPU-friendly width
BIFLOW_PAPER_STRUCTURE = dict(
    channels=8,
    dim=12,
    dim_mults=(1, 1, 2, 4, 8),
    use_attn=(0, 0, 0, 1, 1),
    attn_heads=2,
    resnet_groups=4,
    dit_heads=2,
    sub_volume=8,
    classes=7,
)


def tiny_fixture() -> dict:
    path = REF / "official_tiny.pt"
    if not path.is_file():
        pytest.skip(f"reference fixtures not found at {REF}")
    return torch.load(path, map_location="cpu", weights_only=True)


def paper_keys() -> dict:
    path = REF / "official_keys_paper.json"
    if not path.is_file():
        pytest.skip(f"reference fixtures not found at {REF}")
    return json.loads(path.read_text())


def demo_config(*overrides: str):
    from meddiffusion3d.config import Config
    from medsynth_core.config import load_config

    return load_config(Config, DEMO, list(overrides))

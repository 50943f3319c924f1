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


def tiny_fixture() -> dict:
    path = REF / "official_tiny.pt"
    if not path.is_file():
        pytest.skip(f"reference fixtures not found at {REF}")
    return torch.load(path, map_location="cpu", weights_only=False)


def paper_keys() -> dict:
    path = REF / "official_keys_paper.json"
    if not path.is_file():
        pytest.skip(f"reference fixtures not found at {REF}")
    return json.loads(path.read_text())


def demo_config(*overrides: str):
    from meddiffusion3d.config import Config
    from medsynth_core.config import load_config

    return load_config(Config, DEMO, list(overrides))

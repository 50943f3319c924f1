from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsynth_core.config import load_config
from uni_coal.config import Config

PKG = Path(__file__).resolve().parents[1]
REF = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "uni-coal"


# the spec §8 tiny network: demo.yaml at the widths of spec §8 (the demo recipe doubles them, issue 15)
TINY_WIDTHS = ("generator.channel_base=512", "generator.channel_max=32")


@pytest.fixture
def demo_cfg() -> Config:
    return load_config(Config, PKG / "configs" / "demo.yaml", list(TINY_WIDTHS))


@pytest.fixture(scope="session")
def tiny_fixture():
    path = REF / "official_tiny.pt"
    if not path.is_file():
        pytest.skip(f"reference fixture {path} absent")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def paper_keys():
    import json

    path = REF / "official_keys_paper.json"
    if not path.is_file():
        pytest.skip(f"reference fixture {path} absent")
    return json.loads(path.read_text())

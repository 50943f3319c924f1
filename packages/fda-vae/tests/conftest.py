from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fda_vae.config import Config
from medsynth_core.config import load_config

PKG = Path(__file__).resolve().parents[1]
REF = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "fda-vae"


def tiny_overrides(tmp_path) -> list[str]:
    """Spec §7 tiny config at 16x16 on phantoms (the official tiny network: channels 8/16, latent 4)."""
    return [
        f"run.root={tmp_path}",
        "model.channels=[8,16]",
        "model.latent_channels=4",
        "train.batch_size=2",
        "data.image_size=16",
        "data.phantom_train=8",
        "data.phantom_val=2",
        "data.phantom_size=32",
        "run.threads=0",
        "train.log_every=1",
    ]


@pytest.fixture
def tiny_cfg(tmp_path) -> Config:
    return load_config(Config, PKG / "configs" / "demo.yaml", tiny_overrides(tmp_path))


@pytest.fixture
def paper_cfg() -> Config:
    return load_config(Config, PKG / "configs" / "paper.yaml")


@pytest.fixture
def ref_dir() -> Path:
    if not REF.is_dir():
        pytest.skip("reference fixtures ../shared/reference/fda-vae not present")
    return REF


def toy_pairs(n: int = 16, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spec §7 toy: smooth Gaussian body + random lesion disc; A body .6/lesion .4, B body .3/lesion .9."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) * 2 - 1
    a, b = [], []
    for _ in range(n):
        body = np.exp(-(xx**2 + yy**2) / (2 * 0.45**2)) > 0.3
        cy, cx = rng.uniform(-0.3, 0.3, 2)
        r = rng.uniform(0.12, 0.25)
        lesion = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        a.append(np.where(lesion, 0.4, np.where(body, 0.6, 0.0)).astype(np.float32))
        b.append(np.where(lesion, 0.9, np.where(body, 0.3, 0.0)).astype(np.float32))
    return np.stack(a), np.stack(b)

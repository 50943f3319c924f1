"""Test-wide settings: few CPU threads (2-core machines oversubscribe badly), no network."""

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="medsynth-torch-home-")

import torch  # noqa: E402

torch.set_num_threads(1)

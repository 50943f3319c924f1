"""Training: exact resume (N straight == N/2 + resume + N/2, generator and discriminator steps), stage 2
from stage 1 with frozen encoder/codebook, and a torchrun --nproc_per_node=2 (gloo) run of the demo config."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meddiffusion3d.train_ae import latest_checkpoint, train_ae
from medsynth_core.checkpoint import load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import DEMO, demo_config  # noqa: E402

from medsynth_core.distributed import torchrun_command

FAST = ["ae.stage1.disc_start=1", "ae.stage1.ckpt_every=2", "ae.stage1.image_every=100", "data.n_volumes=2"]


def _states(path):
    ck = load_checkpoint(path, kind="meddiffusion3d-ae")
    return ck


def _assert_same(a, b):
    for group in ("models", "optimizers"):
        for name in a[group]:
            sa, sb = a[group][name], b[group][name]
            if group == "optimizers":
                sa, sb = sa["state"], sb["state"]
                for k in sa:
                    for kk in sa[k]:
                        assert torch.equal(torch.as_tensor(sa[k][kk]), torch.as_tensor(sb[k][kk])), (
                            name,
                            k,
                            kk,
                        )
            else:
                for k in sa:
                    assert torch.equal(sa[k], sb[k]), (name, k)


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    straight = demo_config(f"run.root={tmp_path / 'a'}", "ae.stage1.steps=4", *FAST)
    train_ae(straight, 1)
    first = demo_config(f"run.root={tmp_path / 'b'}", "ae.stage1.steps=2", *FAST)
    train_ae(first, 1)
    resumed = demo_config(f"run.root={tmp_path / 'b'}", "ae.stage1.steps=4", *FAST)
    train_ae(resumed, 1)
    a, b = latest_checkpoint(straight, 1), latest_checkpoint(resumed, 1)
    assert a.name == b.name == "step_00000004.pt"
    ca, cb = _states(a), _states(b)
    assert ca["optimizers"]["opt_d"]["state"]  # the discriminator stepped (step 1 and 3)
    _assert_same(ca, cb)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = torchrun_command(
        "-m",
        "meddiffusion3d.cli",
        "train-ae",
        "--stage",
        "1",
        "--config",
        str(DEMO),
        f"run.root={tmp_path}",
        "ae.stage1.steps=2",
        "run.threads=1",
        *FAST,
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = load_checkpoint(
        tmp_path / "meddiffusion3d" / "demo" / "stage1" / "checkpoints" / "step_00000002.pt",
        kind="meddiffusion3d-ae",
    )
    assert ck["step"] == 2
    assert all(torch.isfinite(v).all() for v in ck["models"]["ae"].values() if v.is_floating_point())
    assert bool(ck["models"]["ae"]["codebook.initialized"])

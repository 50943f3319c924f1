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

FAST = ["ae.stage1.disc_start=1", "ae.stage1.ckpt_every=2", "ae.stage1.sample_every=100", "data.n_volumes=2"]


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


def test_keyed_tri_plane_slices_average_the_drawn_slices():
    """``run.deterministic``, one process: the keyed tri-plane loss is the mean perceptual distance over
    ⌊ratio·B·n⌋ slices per plane drawn with the step's generator (the same slices for the same key)."""
    from meddiffusion3d.losses import TinyRandomPerceptual, TriPlanePerceptual

    tp = TriPlanePerceptual(TinyRandomPerceptual(), ratio=0.25)
    x, y = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    tp.generator = torch.Generator().manual_seed(3)
    got = tp(x, y)
    g = torch.Generator().manual_seed(3)
    want = 0.0
    for axis in range(3):
        xs, ys = tp.plane_slices(x, axis), tp.plane_slices(y, axis)
        idx = torch.randperm(16, generator=g)[:4]
        want += tp.net(xs[idx], ys[idx]).mean()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    tp.generator = torch.Generator().manual_seed(3)
    assert torch.equal(tp(x, y), got)
    tp.generator = torch.Generator().manual_seed(4)
    assert not torch.equal(tp(x, y), got)


def test_keyed_restart_codes_come_from_the_global_batch():
    """``run.deterministic``, one process: the codebook's init codes are a keyed draw of the batch's latent
    vectors (tiled with noise), reproducible for the same key; without a generator the official draw."""
    from meddiffusion3d.quantizer import Codebook

    cb = Codebook(n_codes=32, embedding_dim=4)
    z = torch.randn(2, 4, 2, 2, 2)  # 16 vectors < 32 codes: tiled twice, with noise
    cb.generator = torch.Generator().manual_seed(5)
    cb.train()
    cb(z)
    first = cb.embeddings.clone()
    flat = z.movedim(1, -1).reshape(-1, 4)
    assert torch.cdist(first, flat).min(1).values.max() < 0.05  # every code is a (noised) batch vector
    cb2 = Codebook(n_codes=32, embedding_dim=4)
    cb2.generator = torch.Generator().manual_seed(5)
    cb2.train()
    cb2(z)
    assert torch.equal(cb2.embeddings, first)


@pytest.mark.slow
def test_deterministic_ae_stage1_ddp_equals_one_process(tmp_path):
    """Issue 18, ``run.deterministic``: stage 1 (codebook init and restarts, tri-plane slices) trained by
    2 torchrun ranks x batch 2 equals 1 process x batch 4 after 3 steps before the discriminator starts (its
    BatchNorm normalises each process's batch, logged); without the flag the runs differ."""
    from medsynth_core.testing import state_dict_mismatch

    steps = ["ae.stage1.steps=3", "ae.stage1.ckpt_every=3", "ae.stage1.disc_start=10", "ae.stage1.sample_every=100",
             "data.n_volumes=4", "run.threads=1"]  # fmt: skip
    one = demo_config(f"run.root={tmp_path / 'one'}", *steps, "ae.stage1.batch_size=4", "run.deterministic=true")
    train_ae(one, 1)
    plain = demo_config(f"run.root={tmp_path / 'plain'}", *steps, "ae.stage1.batch_size=4")
    train_ae(plain, 1)
    cmd = torchrun_command("-m", "meddiffusion3d.cli", "train-ae", "--stage", "1", "--config", str(DEMO),
                           f"run.root={tmp_path / 'two'}", *steps, "ae.stage1.batch_size=2", "run.deterministic=true")  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = _states(latest_checkpoint(one, 1))["models"]["ae"]
    b = _states(tmp_path / "two" / "meddiffusion3d" / "demo" / "stage1" / "checkpoints" / "step_00000003.pt")
    c = _states(latest_checkpoint(plain, 1))["models"]["ae"]
    lr = one.ae.stage1.lr
    frac, worst = state_dict_mismatch(a, b["models"]["ae"])
    assert frac <= 1e-3 and worst <= 0.5 * lr, (frac, worst)
    torch.testing.assert_close(a["codebook.embeddings"], b["models"]["ae"]["codebook.embeddings"], rtol=1e-4, atol=1e-5)
    frac, worst = state_dict_mismatch(a, c)
    assert frac > 0.1, (frac, worst)

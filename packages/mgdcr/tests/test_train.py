"""Training: data pipeline, bit-exact resume (F3), torchrun/gloo DDP, bad inputs."""

import os
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core.checkpoint import load_checkpoint
from medsynth_core.cli import UserError
from medsynth_core.config import ConfigError, load_config
from medsynth_core.distributed import torchrun_command
from medsynth_core.io import MedicalImage, write_image
from mgdcr.config import Config, DataConfig
from mgdcr.data import SliceDataset, build_datasets, load_cine, normalise_cine, subject_split
from mgdcr.infer import load_prior
from mgdcr.train import train

PKG = Path(__file__).resolve().parents[1]
MICRO = PKG / "configs" / "micro.yaml"


def _cfg(tmp_path, *extra):
    return load_config(Config, MICRO, [f"run.root={tmp_path}", *extra])


def test_resume_is_bit_exact(tmp_path):
    straight = _cfg(tmp_path / "a", "train.steps=4", "train.ckpt_every=4", "train.sample_every=0")
    run_a = train(straight)
    half = _cfg(tmp_path / "b", "train.steps=2", "train.ckpt_every=2", "train.sample_every=0")
    train(half)
    run_b = train(replace(half, train=replace(half.train, steps=4, ckpt_every=4)))  # auto-resume from step 2
    a = load_checkpoint(run_a / "checkpoints" / "step_00000004.pt", kind="mgdcr")
    b = load_checkpoint(run_b / "checkpoints" / "step_00000004.pt", kind="mgdcr")
    for k, v in a["models"]["model"].items():
        assert torch.equal(v, b["models"]["model"][k]), k
    for k, v in a["emas"]["ema"]["module"].items():
        assert torch.equal(v, b["emas"]["ema"]["module"][k]), k
    sa, sb = a["optimizers"]["opt"]["state"], b["optimizers"]["opt"]["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    assert a["step"] == b["step"] == 4
    # the trained weights moved and the EMA differs from the raw weights
    w = "unet.out.2.weight"
    assert a["models"]["model"][w].abs().sum() > 0
    assert not torch.equal(a["models"]["model"][w], a["emas"]["ema"]["module"][w])
    assert (run_a / "checkpoints" / "config.yaml").is_file()
    model, cfg = load_prior(run_a / "checkpoints" / "step_00000004.pt")
    assert cfg.model.image_size == 16 and torch.equal(model.state_dict()[w], a["emas"]["ema"]["module"][w])


def test_training_writes_samples_and_metrics(tmp_path):
    run = train(_cfg(tmp_path, "train.steps=2", "train.sample_every=2", "train.ckpt_every=2"))
    assert (run / "images" / "samples_00000002.png").is_file()
    assert (run / "metrics.jsonl").read_text().count("loss") == 2


@pytest.mark.slow
def test_torchrun_ddp_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command(
        "-m",
        "mgdcr.cli",
        "train",
        "--config",
        str(MICRO),
        f"run.root={tmp_path}",
        "train.steps=2",
        "train.ckpt_every=2",
        "train.sample_every=0",
    )
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path / "mgdcr" / "micro" / "checkpoints" / "step_00000002.pt", kind="mgdcr")
    assert ck["step"] == 2


def test_nifti_pipeline_normalisation_and_split(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.random((2, 3, 16, 16)) * 100  # (T, Z, H, W)
    arr[:, 0] = 0  # an empty slice
    aff = np.diag([1.8, 1.8, 10.0, 1.0])
    for i in range(3):
        write_image(MedicalImage.from_dhw(arr.astype(np.float32), aff), tmp_path / f"s{i}_sa.nii.gz")
    a, dhw_aff = load_cine(tmp_path / "s0_sa.nii.gz")
    assert a.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(np.linalg.norm(dhw_aff[:3, 0]), 10.0, rtol=1e-6)  # slice axis first
    n = normalise_cine(a, DataConfig())
    p98 = np.percentile(a, 98)
    np.testing.assert_allclose(n, np.clip(a, 0, p98) / p98, rtol=1e-6)
    ds = SliceDataset([n], 16)
    assert len(ds) == 6 and ds[0].shape == (1, 16, 16) and float(ds[0].min()) == -1.0
    assert len(SliceDataset([n], 16, drop_empty=True)) == 4
    tr, va = subject_split(list(range(10)), 0.2, 0)
    assert len(va) == 2 and not set(tr) & set(va)
    assert subject_split(list(range(10)), 0.0, 0) == (list(range(10)), [])  # fork: no split (val = train)
    cfg = load_config(Config, MICRO, ["data.source=nifti", f"data.root={tmp_path}", "data.val_fraction=0.34"])
    train_ds, val_ds = build_datasets(cfg)
    assert len(train_ds) == 12 and len(val_ds) == 6
    with pytest.raises(UserError, match="model.image_size"):
        SliceDataset([n], 32, names=["s0_sa.nii.gz"])


def test_bad_config_and_empty_folder(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        _cfg(tmp_path, "train.lrr=1")
    (tmp_path / "empty").mkdir()
    cfg = load_config(Config, MICRO, ["data.source=nifti", f"data.root={tmp_path / 'empty'}"])
    with pytest.raises(Exception, match="no image file"):
        build_datasets(cfg)


def test_latent_ddim_optional(tmp_path):
    from mgdcr.model import LatentMLP
    from mgdcr.train import sample_unconditional, train_latent

    net = LatentMLP(8, num_layers=4, hidden=16, time_channels=6)
    # layer widths: 8→16, (16+8)→16, (16+8)→16, (16+8)→8; conditioned layers add Linear(8→16) each
    expect = (
        (6 * 8 + 8 + 8 * 8 + 8)
        + (8 * 16 + 16 + 8 * 16 + 16 + 2 * 16)
        + 2 * (24 * 16 + 16 + 8 * 16 + 16 + 2 * 16)
        + (24 * 8 + 8)
    )
    assert sum(p.numel() for p in net.parameters()) == expect
    assert net(torch.randn(3, 8), torch.tensor([0, 5, 999])).shape == (3, 8)
    prior_run = train(_cfg(tmp_path, "train.steps=1", "train.ckpt_every=1", "train.sample_every=0"))
    prior = prior_run / "checkpoints" / "step_00000001.pt"
    cfg = _cfg(
        tmp_path,
        "latent.enabled=true",
        f"latent.prior={prior}",
        "latent.num_layers=3",
        "latent.hidden=32",
        "latent.batch_size=8",
        "latent.steps=3",
        "latent.ckpt_every=3",
    )
    run = train_latent(cfg)
    ck = load_checkpoint(run / "checkpoints" / "step_00000003.pt", kind="mgdcr")
    assert ck["extra"]["z_mean"].shape == (32,) and torch.all(ck["extra"]["z_std"] > 0)
    imgs = sample_unconditional(run / "checkpoints" / "step_00000003.pt", n=2, steps=5)
    assert imgs.shape == (2, 1, 16, 16) and torch.isfinite(imgs).all() and imgs.abs().max() <= 1
    with pytest.raises(ValueError, match="latent"):
        sample_unconditional(prior, n=1)


def test_const_beta_schedule():
    from mgdcr.diffusion import GaussianDiffusion

    d = GaussianDiffusion(const_beta=0.008)
    np.testing.assert_allclose(d.alphas_cumprod[[0, 9]], [0.992, 0.992**10], rtol=1e-12)


def test_lr_schedules():
    """``constant`` (fork: no warm-up, constant lr) and the ``cosine`` extension (warm-up, decay to 0)."""
    from mgdcr.config import TrainConfig
    from mgdcr.train import learning_rate

    const = TrainConfig(lr=1e-3, steps=100)
    assert [learning_rate(s, const) for s in (0, 50, 99)] == [1e-3, 1e-3, 1e-3]
    cos = TrainConfig(lr=1e-3, steps=110, lr_schedule="cosine", warmup_steps=10)
    lrs = [learning_rate(s, cos) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5e-4)
    assert lrs[109] == pytest.approx(1e-3 * 0.5 * (1 + np.cos(np.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_cosine_run_stopped_with_until_resumes_exactly(tmp_path):
    """``train(cfg, until=h)`` keeps the full run's schedule horizon, so stopping at h and resuming equals
    an uninterrupted run (what ``demo`` does); the optimiser saw the scheduled lr."""
    extra = (
        "train.steps=4",
        "train.ckpt_every=0",
        "train.sample_every=0",
        "train.lr_schedule=cosine",
        "train.warmup_steps=1",
        "train.lr=1e-3",
    )
    run_a = train(_cfg(tmp_path / "a", *extra))
    cfg_b = _cfg(tmp_path / "b", *extra)
    train(cfg_b, until=2)
    assert [p.name for p in sorted((tmp_path / "b").rglob("step_*.pt"))] == ["step_00000002.pt"]
    run_b = train(cfg_b)
    a = load_checkpoint(run_a / "checkpoints" / "step_00000004.pt", kind="mgdcr")
    b = load_checkpoint(run_b / "checkpoints" / "step_00000004.pt", kind="mgdcr")
    for k, v in a["models"]["model"].items():
        assert torch.equal(v, b["models"]["model"][k]), k
    from mgdcr.train import learning_rate

    assert a["optimizers"]["opt"]["param_groups"][0]["lr"] == pytest.approx(learning_rate(3, cfg_b.train))


def test_validation_split_is_used_and_the_best_checkpoint_kept(tmp_path):
    """The config's validation subjects are scored every train.val_every steps (reconstruction PSNR with
    inferred x_T, EMA weights), the best is kept as best.pt, and validating leaves the training unchanged."""
    import json

    from mgdcr.data import build_datasets
    from mgdcr.diffusion import GaussianDiffusion
    from mgdcr.train import validate, validation_slices

    args = ("train.steps=4", "train.ckpt_every=4", "train.sample_every=0", "train.val_samples=8")
    run = train(_cfg(tmp_path / "v", *args, "train.val_every=1"))
    rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert [r["step"] for r in val] == [1, 2, 3, 4]
    psnr = [r["psnr_recon_db"] for r in val]
    assert all(np.isfinite(p) and 0 < p < 100 for p in psnr)
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["val_psnr"] == pytest.approx(max(psnr)) and best["step"] == 1 + int(np.argmax(psnr))
    ck = load_checkpoint(run / "checkpoints" / "best.pt", kind="mgdcr")
    assert ck["step"] == best["step"]
    # the PSNR is recomputed from best.pt's EMA weights on the validation slices of the config
    cfg = _cfg(tmp_path / "v", *args)
    _, val_ds = build_datasets(cfg)
    assert len(val_ds) > 0
    x = validation_slices(val_ds, 8)
    model, _ = load_prior(run / "checkpoints" / "best.pt")
    d = GaussianDiffusion(cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
    assert validate(model, d, x, cfg.diffusion.eval_steps) == pytest.approx(best["val_psnr"], abs=1e-4)
    # validating at every step vs only at the last: the same weights at step 4
    other = train(_cfg(tmp_path / "w", *args, "train.val_every=0"))
    a = load_checkpoint(run / "checkpoints" / "step_00000004.pt", kind="mgdcr")
    b = load_checkpoint(other / "checkpoints" / "step_00000004.pt", kind="mgdcr")
    for k, v in a["models"]["model"].items():
        assert torch.equal(v, b["models"]["model"][k]), k
    assert [json.loads(r)["step"] for r in (other / "metrics.jsonl").read_text().splitlines()
            if json.loads(r)["split"] == "val"] == [4]  # fmt: skip


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_sigterm_checkpoints_and_resume_is_exact(tmp_path, capsys):
    """Issue 18 (preemption): SIGTERM mid-run checkpoints the step in progress, the CLI exits 143 with one
    line, the handler is restored; resuming equals an uninterrupted run bit for bit, one log row per step."""
    import json
    import signal
    import threading
    import time

    from mgdcr.cli import main

    run = tmp_path / "pre" / "mgdcr" / "micro"
    args = ["train.ckpt_every=0", "train.sample_every=0", "train.val_every=0", "train.log_every=1"]

    def kill_after_rows(n: int) -> None:
        t0 = time.time()
        while time.time() - t0 < 300:
            rows = run / "metrics.jsonl"
            if rows.is_file() and len(rows.read_text().splitlines()) >= n:
                os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, as a scheduler's signal
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_rows, args=(3,), daemon=True)
    killer.start()
    cmd = ["train", "--config", str(MICRO), f"run.root={tmp_path / 'pre'}", "train.steps=500", *args]
    assert main(cmd) == 143
    killer.join()
    err = capsys.readouterr().err
    ckpts = sorted((run / "checkpoints").glob("step_*.pt"))
    assert len(ckpts) == 1, ckpts
    k = load_checkpoint(ckpts[0], kind="mgdcr")["step"]
    assert 3 <= k < 500 and f"mgdcr train: stopped by SIGTERM after step {k}" in err, err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the guard restored the handler
    report: dict = {}
    resumed = train(_cfg(tmp_path / "pre", f"train.steps={k + 2}", *args), report=report)
    straight = train(_cfg(tmp_path / "straight", f"train.steps={k + 2}", *args))
    assert report == {"start": k, "step": k + 2, "preempted": None}
    a = load_checkpoint(resumed / "checkpoints" / f"step_{k + 2:08d}.pt", kind="mgdcr")
    b = load_checkpoint(straight / "checkpoints" / f"step_{k + 2:08d}.pt", kind="mgdcr")
    for key, v in a["models"]["model"].items():
        assert torch.equal(v, b["models"]["model"][key]), key
    for key, v in a["emas"]["ema"]["module"].items():
        assert torch.equal(v, b["emas"]["ema"]["module"][key]), key
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split", "train") == "train"] == list(range(1, k + 3))


def test_deterministic_ddp_equals_one_process(tmp_path):
    """Issue 18, ``run.deterministic``: 2 torchrun ranks x batch 2 equal 1 process x batch 4 after 3 steps
    (fp32 all-reduce order: rtol 1e-4, atol 1e-5); the keyed draws are other draws than the default mode's."""
    extra = ["train.steps=3", "train.ckpt_every=3", "train.sample_every=0", "train.val_every=0"]
    one = train(_cfg(tmp_path / "one", *extra, "train.batch_size=4", "run.deterministic=true"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_command("-m", "mgdcr.cli", "train", "--config", str(MICRO), f"run.root={tmp_path / 'two'}",
                           *extra, "train.batch_size=2", "run.deterministic=true")  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(one / "checkpoints" / "step_00000003.pt", kind="mgdcr")
    b = load_checkpoint(
        tmp_path / "two" / "mgdcr" / "micro" / "checkpoints" / "step_00000003.pt", kind="mgdcr"
    )
    moved = 0.0
    for k, v in a["models"]["model"].items():
        torch.testing.assert_close(v, b["models"]["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    plain = train(_cfg(tmp_path / "plain", *extra, "train.batch_size=4"))
    c = load_checkpoint(plain / "checkpoints" / "step_00000003.pt", kind="mgdcr")
    for k, v in a["models"]["model"].items():
        moved = max(moved, float((v - c["models"]["model"][k]).abs().max()))
    assert moved > 1e-4  # keyed draws are other draws than the global generator's: the flag changes the run

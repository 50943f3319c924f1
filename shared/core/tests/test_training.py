import json

import pytest
import torch
from torch.utils.data import Dataset

from medsynth_core.training import (
    EMA,
    BucketLoader,
    ResumableLoader,
    RunDir,
    RunLogger,
    autocast,
    autocast_dtype,
    clip_gradients,
    count_parameters,
    ema_decay_from_half_life,
    grad_scaler,
    index_rng,
    num_threads,
)


class Toy(Dataset):
    def __init__(self, n=10):
        self.n = n
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        aug = index_rng(7, self.epoch, i).normal()
        return torch.tensor([float(i), aug])


def test_ema_math_and_state():
    m = torch.nn.Linear(3, 2)
    ema = EMA(m, decay=0.9)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert torch.allclose(ema.module.weight, 0.9 * w0 + 0.1 * (w0 + 1.0), atol=1e-6)
    ema.update(m, decay=0.0)
    assert torch.equal(ema.module.weight, m.weight)
    assert not ema.module.weight.requires_grad and not ema.module.training
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and other.num_updates == 2
    assert torch.equal(other.module.weight, ema.module.weight)
    with pytest.raises(ValueError):
        EMA(m, decay=1.5)


def test_half_life_decay():
    d = ema_decay_from_half_life(batch_size=4, half_life_samples=10_000)
    assert d ** (10_000 / 4) == pytest.approx(0.5, rel=1e-9)


def test_cpu_autocast_is_noop_and_scaler_disabled():
    assert autocast_dtype("cpu") is None
    x = torch.randn(2, 2)
    with autocast("cpu"):
        y = x @ x
    assert y.dtype == torch.float32
    assert not grad_scaler("cpu").is_enabled()


def test_clip_gradients():
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 3.0)
    assert clip_gradients([p], None) == pytest.approx(6.0)
    total = clip_gradients([p], 1.0)
    assert total == pytest.approx(6.0)
    assert p.grad.norm().item() == pytest.approx(1.0, rel=1e-5)


def test_count_parameters():
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    m[1].requires_grad_(False)
    assert count_parameters(m) == {"total": 11, "trainable": 8}


def collect(loader, start, stop):
    return [b.clone() for _, b in loader.iterate(start, stop)]


def test_resumable_loader_skips_exactly():
    ds = Toy(10)
    loader = ResumableLoader(ds, batch_size=3, seed=5)
    assert loader.steps_per_epoch == 3  # drop_last
    straight = collect(loader, 0, 8)
    resumed = collect(ResumableLoader(Toy(10), 3, seed=5), 0, 4) + collect(ResumableLoader(Toy(10), 3, seed=5), 4, 8)
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed)) and len(resumed) == 8
    # each epoch is a permutation without repeats; epochs differ
    e0 = torch.cat(straight[:3])[:, 0].tolist()
    e1 = torch.cat(straight[3:6])[:, 0].tolist()
    assert len(set(e0)) == 9 and e0 != e1
    # per-item augmentation depends on (epoch, index) only
    assert straight[0][0, 1] == index_rng(7, 0, int(straight[0][0, 0])).normal()


def test_resumable_loader_workers_match_main_process():
    a = collect(ResumableLoader(Toy(8), 2, seed=1), 0, 6)
    b = collect(ResumableLoader(Toy(8), 2, seed=1, num_workers=2), 0, 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        ResumableLoader(Toy(0), 2)


def test_run_dir_and_logger(tmp_path):
    run = RunDir.create(tmp_path, "pkg", "exp")
    assert run.checkpoints.is_dir() and run.images.is_dir()
    with RunLogger(run) as logger:
        logger.log(3, {"loss": torch.tensor(0.5), "lr": 1e-4}, console=True)
        logger.log(4, {"psnr": 20.0}, prefix="val")
    rows = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[0]["loss"] == 0.5 and rows[1]["split"] == "val"
    assert any(run.tensorboard.iterdir())


def test_due_interval_rule():
    from medsynth_core.training import due

    assert [d for d in range(1, 11) if due(d, 4, 10)] == [4, 8, 10]
    assert [d for d in range(1, 11) if due(d, 0, 10)] == [10]
    assert [d for d in range(1, 4) if due(d, 1, 3)] == [1, 2, 3]
    with pytest.raises(ValueError, match=">= 0"):
        due(1, -1, 3)


def test_runlogger_resume_drops_rows_after_the_resume_step(tmp_path):
    """Issue 18: after a crash and resume, metrics.jsonl keeps one row per step and split."""
    import json as _json

    from medsynth_core.training import RunDir, RunLogger, truncate_metrics

    run = RunDir.create(tmp_path, "pkg", "r")
    with RunLogger(run, enabled=True, tensorboard=False) as lg:
        for s in range(1, 6):
            lg.log(s, {"loss": float(s)})
        lg.log(4, {"psnr": 20.0}, prefix="val")
    with open(run.metrics, "a") as f:
        f.write('{"step": 6, "spl')  # a row cut by the crash
    with RunLogger(run, enabled=True, tensorboard=False, resume_step=3) as lg:  # checkpoint at step 3
        for s in range(4, 6):
            lg.log(s, {"loss": 10.0 + s})
    rows = [_json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train"), (3, "train"), (4, "train"), (5, "train")]
    assert rows[-1]["loss"] == 15.0
    assert truncate_metrics(run.metrics, 10) == 0 and truncate_metrics(tmp_path / "none.jsonl", 0) == 0


def test_preemption_guard_flags_sigterm_and_restores_the_handler():
    import os
    import signal

    from medsynth_core.cli import EXIT_PREEMPTED, preempted_exit
    from medsynth_core.training import PreemptionGuard

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as stop:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the guard
        assert stop.should_stop() and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    assert preempted_exit("pkg", {"preempted": "SIGTERM", "step": 7}) == EXIT_PREEMPTED == 143
    assert preempted_exit("pkg", {"preempted": None}) == 0


def test_num_threads_restores_the_callers_count():
    before = torch.get_num_threads()
    with num_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), num_threads(before + 2):
        raise RuntimeError("a failing recipe")
    assert torch.get_num_threads() == before
    with num_threads(0):  # 0/None: leave the count alone
        assert torch.get_num_threads() == before



class _Shaped(Dataset):
    """Items whose value is their index, in two 'resolutions' (bucket = index % 2)."""

    def __init__(self, n=23):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 2 + i % 2), float(i))


def test_bucket_loader_one_bucket_per_batch_per_bucket_batch_sizes_and_exact_resume():
    ds = _Shaped(23)
    buckets = [i % 2 for i in range(23)]  # 12 of bucket 0, 11 of bucket 1
    loader = BucketLoader(ds, buckets, {0: 4, 1: 3}, seed=5)
    assert loader.steps_per_epoch == 12 // 4 + 11 // 3 == 6
    run = list(loader.iterate(0, 18))
    for _, batch in run:  # one bucket per batch (it stacks), with that bucket's batch size
        ids = batch[:, 0, 0].long().tolist()
        assert len({i % 2 for i in ids}) == 1 and len(ids) == (4 if ids[0] % 2 == 0 else 3)
    epoch0 = [i for _, b in run[:6] for i in b[:, 0, 0].long().tolist()]
    assert len(set(epoch0)) == len(epoch0) == 12 + 9  # no repeats within an epoch; remainders dropped
    assert [b[:, 0, 0].tolist() for _, b in run[:6]] != [b[:, 0, 0].tolist() for _, b in run[6:12]]
    resumed = list(loader.iterate(7, 18))  # restart mid-epoch: the same batches from step 7 on
    assert [s for s, _ in resumed] == list(range(7, 18))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, run[7:]))


def test_bucket_loader_shards_each_global_batch_over_ranks():
    ds = _Shaped(24)
    buckets = [i % 2 for i in range(24)]
    ranks = [list(BucketLoader(ds, buckets, {0: 3, 1: 2}, seed=1, world_size=2, rank=r).iterate(0, 5))
             for r in (0, 1)]
    for (_, a), (_, b) in zip(*ranks):
        ia, ib = a[:, 0, 0].long().tolist(), b[:, 0, 0].long().tolist()
        assert {i % 2 for i in ia} == {i % 2 for i in ib} and len(ia) == len(ib)  # same bucket, same step
        assert not set(ia) & set(ib)
    with pytest.raises(ValueError, match="bucket 1"):
        BucketLoader(ds, buckets, {0: 3, 1: 7}, world_size=2, rank=0)


def test_checkpoint_step_saves_when_due_or_stopping_once():
    import signal

    from medsynth_core.training import PreemptionGuard

    saved = []
    with PreemptionGuard() as stop:
        assert stop.checkpoint_step(1, 2, 5, saved.append) is False and saved == []
        assert stop.checkpoint_step(2, 2, 5, saved.append) is False and saved == [2]
        stop._handle(signal.SIGTERM, None)
        assert stop.checkpoint_step(3, 2, 5, saved.append) is True and saved == [2, 3]
        assert stop.checkpoint_step(4, 2, 5, saved.append) is True and saved == [2, 3, 4]  # due: saved once

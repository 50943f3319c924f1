import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core.checkpoint import (
    CheckpointError,
    CheckpointManager,
    atomic_torch_save,
    build_checkpoint,
    load_checkpoint,
    load_module_state,
    restore_checkpoint,
)
from medsynth_core.training import EMA


def make(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched, EMA(model, 0.9)


def train_steps(model, opt, sched, ema, n):
    losses = []
    for _ in range(n):
        x = torch.randn(8, 4)  # consumes the torch RNG: resume must restore it
        noise = np.random.rand() + random.random()  # noqa: NPY002  # and numpy / python RNGs
        loss = ((model(x) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
    return losses


def seed_all(s):
    torch.manual_seed(s)
    np.random.seed(s)  # noqa: NPY002
    random.seed(s)


def test_resume_is_bit_exact(tmp_path):
    seed_all(1)
    model, opt, sched, ema = make()
    straight = train_steps(model, opt, sched, ema, 6)
    final_straight = [p.clone() for p in model.parameters()]

    seed_all(1)
    model, opt, sched, ema = make()
    first = train_steps(model, opt, sched, ema, 3)
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    ck = build_checkpoint(kind="toy", step=3, models={"m": model}, optimizers={"o": opt},
                          schedulers={"s": sched}, emas={"e": ema}, config={"lr": 0.01})
    path = mgr.save(ck)
    train_steps(model, opt, sched, ema, 2)  # diverge, then come back

    model2, opt2, sched2, ema2 = make(seed=123)  # different init: everything must come from the file
    step, _ = restore_checkpoint(load_checkpoint(path, kind="toy"), models={"m": model2},
                                 optimizers={"o": opt2}, schedulers={"s": sched2}, emas={"e": ema2})
    assert step == 3
    second = train_steps(model2, opt2, sched2, ema2, 3)
    assert first + second == straight  # exact float equality
    for a, b in zip(final_straight, model2.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "ckpt" / "config.yaml").read_text().strip() == "lr: 0.01"


def test_keep_last_and_latest(tmp_path):
    model, *_ = make()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 5, 10):
        mgr.save(build_checkpoint(kind="toy", step=step, models={"m": model}))
    mgr.save(build_checkpoint(kind="toy", step=10, models={"m": model}), name="best.pt")
    assert [p.name for p in mgr.list()] == ["step_00000005.pt", "step_00000010.pt"]
    assert mgr.latest().name == "step_00000010.pt"
    assert (tmp_path / "best.pt").exists()


def test_crash_during_save_keeps_previous(tmp_path, monkeypatch):
    model, *_ = make()
    path = tmp_path / "c.pt"
    atomic_torch_save(build_checkpoint(kind="toy", step=1, models={"m": model}), path)
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half-written file, then the "crash"
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save(build_checkpoint(kind="toy", step=2, models={"m": model}), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_foreign_and_corrupt_checkpoints(tmp_path):
    model, *_ = make()
    good = tmp_path / "a.pt"
    atomic_torch_save(build_checkpoint(kind="toy", step=1, models={"m": model}), good)
    with pytest.raises(CheckpointError, match="belongs to 'toy', not 'other'"):
        load_checkpoint(good, kind="other")
    raw = tmp_path / "raw.pt"
    torch.save(model.state_dict(), raw)
    with pytest.raises(CheckpointError, match="convert-official"):
        load_checkpoint(raw)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_module_state_lists_keys():
    model, *_ = make()
    sd = dict(model.state_dict())
    sd.pop("0.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["2.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as err:
        load_module_state(model, sd, source="x.pt")
    msg = str(err.value)
    assert "x.pt" in msg and "0.weight" in msg and "extra.weight" in msg
    assert "2.weight: checkpoint (3, 3) vs model (1, 8)" in msg


def test_missing_named_model(tmp_path):
    model, *_ = make()
    ck = build_checkpoint(kind="toy", step=1, models={"g": model})
    with pytest.raises(CheckpointError, match="has no model 'd'"):
        restore_checkpoint(ck, models={"d": model})


def test_manager_resume_picks_source_and_restores(tmp_path):
    model, *_ = make()
    mgr = CheckpointManager(tmp_path / "ck")
    assert mgr.resume_source() is None and mgr.resume(None, "toy", models={"m": model}) == (0, None)
    for step in (3, 7):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        mgr.save(build_checkpoint(kind="toy", step=step, models={"m": model}))
    target, *_ = make(seed=1)
    step, src = mgr.resume(None, "toy", models={"m": target})  # latest
    assert (step, src.name) == (7, "step_00000007.pt")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), model.state_dict().values()))
    step, src = mgr.resume(tmp_path / "ck" / "step_00000003.pt", "toy", models={"m": target})  # explicit
    assert step == 3 and mgr.resume_source("x.pt") == Path("x.pt")
    with pytest.raises(CheckpointError, match="toy"):
        mgr.resume(None, "other", models={"m": target})  # foreign kind is an error, not a silent resume


def test_manager_saver_builds_and_saves_the_live_state(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    save = mgr.saver("unit", models={"net": net}, optimizers={"opt": opt}, config={"a": 1}, extra={"e": 2})
    assert CheckpointManager(tmp_path / "other").saver("unit", main=False, models={"net": net})(1) is None
    assert not (tmp_path / "other").exists()  # non-main ranks write nothing
    for step in (1, 2, 3):
        net(torch.ones(1, 3)).sum().backward()
        opt.step()
        path = save(step)
    assert [p.name for p in mgr.list()] == ["step_00000002.pt", "step_00000003.pt"]
    best = save(3, name="best.pt")
    ck = torch.load(path, weights_only=False)
    assert ck["kind"] == "unit" and ck["step"] == 3 and ck["extra"] == {"e": 2} and ck["config"] == {"a": 1}
    assert torch.equal(ck["models"]["net"]["weight"], net.weight.detach())  # the state at save time
    assert best.name == "best.pt" and (tmp_path / "config.yaml").is_file()
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    step, _ = mgr.resume(None, "unit", models={"net": net2}, optimizers={"opt": opt2})
    assert step == 3 and torch.equal(net2.weight, net.weight)

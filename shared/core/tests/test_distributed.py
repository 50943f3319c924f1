import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

from medsynth_core import distributed as D


def test_single_process_fallback(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    with D.distributed_session("cpu") as info:
        assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
        assert info.backend is None and info.device == torch.device("cpu")
        assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
        assert D.all_reduce_dict({"a": torch.tensor(2.0), "b": 3}) == {"a": 2.0, "b": 3.0}
        D.barrier()
        m = torch.nn.Linear(2, 2)
        assert D.wrap_ddp(m, info) is m


def test_bad_reduce_op():
    with pytest.raises(ValueError):
        D.all_reduce_dict({"a": 1.0}, op="median")


def test_sampler_single_replica_is_deterministic():
    ds = TensorDataset(torch.arange(10))
    s1, s2 = D.make_sampler(ds, seed=3), D.make_sampler(ds, seed=3)
    s1.set_epoch(2)
    s2.set_epoch(2)
    assert list(s1) == list(s2) and sorted(s1) == list(range(10))


def test_seed_everything_repeats():
    D.seed_everything(5)
    a = torch.rand(3)
    D.seed_everything(5)
    assert torch.equal(a, torch.rand(3))


def test_unwrap_compiled_like():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self._orig_mod = inner

    assert D.unwrap(Wrapper()) is inner


def test_resolve_device_errors_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        D.resolve_device("cuda")


SCRIPT = textwrap.dedent(
    """
    import torch
    from torch.utils.data import TensorDataset
    from medsynth_core import distributed as D

    with D.distributed_session("cpu") as info:
        assert info.world_size == 2 and info.backend == "gloo"
        r = D.all_reduce_dict({"x": float(info.rank), "n": 1.0})
        assert r == {"x": 0.5, "n": 1.0}, r
        assert D.all_reduce_dict({"x": float(info.rank)}, op="max") == {"x": 1.0}
        assert D.all_reduce_dict({"x": 1.0}, op="sum") == {"x": 2.0}
        g = D.all_gather_tensor(torch.tensor([info.rank]))
        assert g.tolist() == [0, 1], g
        s = D.make_sampler(TensorDataset(torch.arange(10)), seed=0)
        s.set_epoch(0)
        mine = torch.tensor(list(s))
        both = D.all_gather_tensor(mine)
        assert sorted(both.tolist()) == list(range(10)), both  # disjoint shards covering the data
        m = D.wrap_ddp(torch.nn.Linear(2, 1), info)
        assert isinstance(m, torch.nn.parallel.DistributedDataParallel)
        loss = m(torch.full((1, 2), float(info.rank + 1))).sum()
        loss.backward()
        grads = D.all_gather_tensor(m.module.weight.grad.detach().clone())
        assert torch.equal(grads[0], grads[1])  # DDP averaged the gradients
        D.barrier()
        if info.is_main:
            print("DDP-OK")
    """
)


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
         "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DDP-OK" in proc.stdout

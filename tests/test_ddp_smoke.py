"""``torchrun --nproc_per_node=2`` (gloo, CPU) smoke test of medsynth_core.distributed."""

import os
import subprocess
import textwrap

import pytest

from medsynth_core.distributed import torchrun_command

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

    import torch.distributed as dist
    assert not dist.is_initialized()  # the session shut the group down
    try:
        with D.distributed_session("cpu"):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not dist.is_initialized()  # also after an exception inside the session
    if D.get_rank() == 0 and __import__("os").environ["RANK"] == "0":
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
        torchrun_command(str(script)),
        capture_output=True, text=True, timeout=150, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DDP-OK" in proc.stdout

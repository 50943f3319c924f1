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

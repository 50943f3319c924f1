"""``run.channels_last`` (issue 19): the switch, the layout it gives a module, and the values it keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsynth_core.config import RunSection
from medsynth_core.training import channels_last_enabled, to_channels_last


def test_auto_is_cuda_only_and_the_config_normalises():
    assert not channels_last_enabled("auto", "cpu")
    assert channels_last_enabled("auto", "cuda")
    assert channels_last_enabled("on", "cpu") and channels_last_enabled(True, "cpu")
    assert not channels_last_enabled("off", "cuda") and not channels_last_enabled(False, "cuda")
    with pytest.raises(ValueError, match="channels_last"):
        channels_last_enabled("sometimes", "cpu")
    assert RunSection().channels_last == "auto"
    assert RunSection(channels_last=True).channels_last == "on"  # YAML reads a bare on/off as a bool
    assert RunSection(channels_last=False).channels_last == "off"
    with pytest.raises(ValueError, match="'channels_last' must be auto, on or off"):
        RunSection(channels_last="fast")


def test_layout_per_rank_and_values_kept():
    torch.manual_seed(0)
    net2 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
    net3 = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.SiLU(), nn.Linear(6, 5))
    before2 = [p.detach().clone() for p in net2.parameters()]
    x2 = torch.randn(2, 3, 16, 16)
    y_ref = net2(x2)
    assert to_channels_last(net2, enabled=False) is net2
    assert all(p.is_contiguous() for p in net2.parameters())
    to_channels_last(net2)
    to_channels_last(net3)
    for p, q in zip(net2.parameters(), before2):
        assert torch.equal(p, q)  # same values, another stride order
    assert net2[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not net2[0].weight.is_contiguous()
    assert net3[0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert net3[2].weight.is_contiguous()  # 2-D weights keep their layout
    y = net2(x2)
    assert y.is_contiguous(memory_format=torch.channels_last)  # the layout is handed on from the weights
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # state dicts load either way (checkpoints of one layout resume in the other)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))
    fresh.load_state_dict(net2.state_dict())
    torch.testing.assert_close(fresh(x2), y_ref, rtol=1e-5, atol=1e-5)

"""Spec §7 item 6: PSNR/SSIM/MAE units and per-slice averaging."""

from __future__ import annotations

import math

import pytest
import torch

from fda_vae.evaluate import evaluate_model, slice_metrics


def test_psnr_20db_ssim_one_mae_ratio():
    y = torch.full((1, 1, 16, 16), 0.5)
    x = y + 0.1  # MSE 0.01 on [0,1]
    m = slice_metrics(x * 2 - 1, y * 2 - 1)  # the function takes [−1,1] images
    assert float(m["psnr"][0]) == pytest.approx(20.0, abs=1e-4)
    same = slice_metrics(x * 2 - 1, x * 2 - 1)
    assert float(same["ssim"][0]) == pytest.approx(1.0, abs=1e-6)
    a, b = torch.rand(3, 1, 16, 16) * 2 - 1, torch.rand(3, 1, 16, 16) * 2 - 1
    mm = slice_metrics(a, b)
    torch.testing.assert_close(mm["mae"], 2 * mm["mae01"])


class _Identity(torch.nn.Module):
    def translate(self, x, src, sample=False, generator=None):
        return x


def test_per_slice_not_pooled():
    b = torch.zeros(2, 1, 16, 16) - 1.0
    a = b.clone()
    a[0] += 0.2  # [0,1] error 0.1 -> 20 dB
    a[1] += 0.02  # [0,1] error 0.01 -> 40 dB
    ds = [{"a": a[i], "b": b[i], "key": f"P{i}_0"} for i in range(2)]
    summary, rows = evaluate_model(
        _Identity(), ds, directions=["a2b"], modes=["deterministic"], batch_size=2, per_volume=True
    )
    res = summary["a2b"]["deterministic"]
    assert res["psnr"] == pytest.approx(30.0, abs=1e-3)  # mean of 20 and 40
    pooled = 10 * math.log10(1 / ((0.01 + 0.0001) / 2))
    assert abs(res["psnr"] - pooled) > 3
    assert len(rows) == 2 and res["n_slices"] == 2 and res["volume"]["n_volumes"] == 2

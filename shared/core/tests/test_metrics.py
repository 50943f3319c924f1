"""Numeric tests for medsynth_core.metrics (CPU, tiny tensors, no downloads)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import pytorch_msssim
import scipy.linalg
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from medsynth_core import metrics as M

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """Any attempt to fetch weights over the network fails the test."""

    def _refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args} {kwargs}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    import torchvision.models._api as tv_api

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _refuse)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ PSNR


def test_psnr_of_mse_001_is_20db():
    g = _gen()
    x = 0.2 + 0.6 * torch.rand(3, 1, 16, 16, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
    y = x + 0.1 * sign  # every error is +-0.1 -> MSE = 0.01 exactly, still inside [0, 1]
    assert torch.allclose(M.mse(x, y), torch.full((3,), 0.01, dtype=torch.float64), atol=1e-12)
    out = M.psnr(x, y, data_range=1.0)
    assert out.shape == (3,)
    assert torch.allclose(out, torch.full((3,), 20.0, dtype=torch.float64), atol=1e-4)
    assert M.psnr(x, y, data_range=1.0, reduction="mean").ndim == 0


@pytest.mark.parametrize("shape", [(2, 1, 20, 24), (2, 2, 9, 10, 11)])
@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
def test_psnr_mse_mae_match_skimage_numpy(shape, data_range):
    g = _gen(1)
    x = data_range * torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + 0.05 * data_range * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, data_range)
    ours_psnr = M.psnr(x, y, data_range=data_range)
    ours_mse, ours_mae, ours_rmse = M.mse(x, y), M.mae(x, y), M.rmse(x, y)
    for b in range(shape[0]):
        xb, yb = x[b].numpy(), y[b].numpy()
        ref = peak_signal_noise_ratio(xb, yb, data_range=data_range)
        assert abs(ours_psnr[b].item() - ref) < 1e-6
        assert abs(ours_mse[b].item() - mean_squared_error(xb, yb)) < 1e-9 * data_range**2
        assert abs(ours_mae[b].item() - np.mean(np.abs(xb - yb))) < 1e-9 * data_range
        assert abs(ours_rmse[b].item() - math.sqrt(mean_squared_error(xb, yb))) < 1e-9 * data_range


def test_psnr_identical_is_inf_and_validates():
    x = torch.rand(2, 1, 8, 8)
    assert torch.isinf(M.psnr(x, x.clone(), data_range=1.0)).all()
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(x, x[:, :, :4], data_range=1.0)
    with pytest.raises(ValueError, match="reduction"):
        M.psnr(x, x, data_range=1.0, reduction="sum")


def test_per_sample_mean_differs_from_batch_pooling():
    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.01  # good sample: MSE 1e-4 -> 40 dB
    y[1] += 0.1  # bad sample: MSE 1e-2 -> 20 dB
    per_sample = M.psnr(x, y, data_range=1.0)
    assert torch.allclose(per_sample, torch.tensor([40.0, 20.0], dtype=torch.float64), atol=1e-9)
    assert abs(M.psnr(x, y, data_range=1.0, reduction="mean").item() - 30.0) < 1e-9
    # pooling the squared errors over the batch first is dominated by the bad sample
    pooled = M.psnr(x.reshape(1, -1), y.reshape(1, -1), data_range=1.0).item()
    assert abs(pooled - 10 * math.log10(1 / ((1e-4 + 1e-2) / 2))) < 1e-9
    assert pooled < 23.0


def test_mae_scales_with_intensity_range():
    g = _gen(2)
    a = torch.rand(3, 1, 10, 10, generator=g) * 2 - 1
    b = torch.rand(3, 1, 10, 10, generator=g) * 2 - 1
    on_pm1 = M.mae(a, b)
    on_01 = M.mae((a + 1) / 2, (b + 1) / 2)
    assert torch.allclose(on_pm1, 2 * on_01, atol=1e-6)


# ------------------------------------------------------------------------------------------ SSIM


@pytest.mark.parametrize("data_range", [1.0, 2.0, 255.0])
def test_ssim_uniform_matches_skimage_2d_3d(data_range):
    g = _gen(3)
    x2 = data_range * torch.rand(2, 1, 23, 19, generator=g, dtype=torch.float64)
    y2 = (x2 + 0.2 * data_range * torch.rand(x2.shape, generator=g, dtype=torch.float64)).clamp(0, data_range)
    x3 = data_range * torch.rand(2, 1, 10, 12, 11, generator=g, dtype=torch.float64)
    y3 = (x3 + 0.2 * data_range * torch.rand(x3.shape, generator=g, dtype=torch.float64)).clamp(0, data_range)
    for x, y in ((x2, y2), (x3, y3)):
        ours = M.ssim(x, y, data_range=data_range, window="uniform")
        for b in range(2):
            ref = structural_similarity(x[b, 0].numpy(), y[b, 0].numpy(), data_range=data_range)
            assert abs(ours[b].item() - ref) < 1e-6
    # another window size
    ours = M.ssim(x2, y2, data_range=data_range, window="uniform", win_size=5)
    ref = structural_similarity(x2[1, 0].numpy(), y2[1, 0].numpy(), data_range=data_range, win_size=5)
    assert abs(ours[1].item() - ref) < 1e-6


def test_ssim_uniform_multichannel_matches_skimage_channel_axis():
    g = _gen(4)
    x2 = torch.rand(2, 3, 16, 18, generator=g, dtype=torch.float64)
    y2 = torch.rand(2, 3, 16, 18, generator=g, dtype=torch.float64) * 0.5 + x2 * 0.5
    x3 = torch.rand(1, 2, 9, 10, 11, generator=g, dtype=torch.float64)
    y3 = (x3 + 0.1 * torch.randn(x3.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    for x, y in ((x2, y2), (x3, y3)):
        ours = M.ssim(x, y, data_range=1.0, window="uniform")
        for b in range(x.shape[0]):
            ref = structural_similarity(x[b].numpy(), y[b].numpy(), data_range=1.0, channel_axis=0)
            assert abs(ours[b].item() - ref) < 1e-6


def test_ssim_identical_is_one_both_windows():
    g = _gen(5)
    for shape in ((2, 1, 24, 24), (2, 1, 12, 13, 14)):
        x = torch.rand(shape, generator=g)
        for window in ("gaussian", "uniform"):
            out = M.ssim(x, x.clone(), data_range=1.0, window=window)
            assert out.shape == (2,)
            assert torch.allclose(out, torch.ones(2), atol=1e-5)


def test_ssim_gaussian_equals_pytorch_msssim():
    g = _gen(6)
    for shape in ((3, 2, 24, 20), (2, 1, 13, 14, 15)):
        x = torch.rand(shape, generator=g)
        y = (x + 0.3 * torch.rand(shape, generator=g)).clamp(0, 1)
        ours = M.ssim(x, y, data_range=1.0)
        ref = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
        assert ours.shape == (shape[0],)
        assert torch.allclose(ours, ref, atol=1e-7)
        assert abs(M.ssim(x, y, data_range=1.0, reduction="mean").item() - ref.mean().item()) < 1e-6
        # lower for a noisier pair
        worse = M.ssim(x, torch.rand(shape, generator=g), data_range=1.0)
        assert (worse < ours).all()


def test_ssim_rejects_small_inputs_and_bad_window():
    x = torch.rand(1, 1, 8, 30)
    with pytest.raises(ValueError, match="win_size=11"):
        M.ssim(x, x, data_range=1.0)
    with pytest.raises(ValueError, match="odd"):
        M.ssim(x, x, data_range=1.0, window="uniform", win_size=4)
    with pytest.raises(ValueError, match="window"):
        M.ssim(x, x, data_range=1.0, window="box")


# ------------------------------------------------------------------------------------------ MS-SSIM


def test_ms_ssim_2d_and_3d():
    g = _gen(7)
    x = torch.rand(2, 1, 161, 161, generator=g)
    assert torch.allclose(M.ms_ssim(x, x.clone(), data_range=1.0), torch.ones(2), atol=1e-5)
    unrelated = M.ms_ssim(x, torch.rand(x.shape, generator=g), data_range=1.0)
    assert unrelated.shape == (2,) and (unrelated < 0.5).all()
    ref = pytorch_msssim.ms_ssim(x, x.flip(-1), data_range=1.0, size_average=False)
    assert torch.allclose(M.ms_ssim(x, x.flip(-1), data_range=1.0), ref, atol=1e-6)

    assert M.ms_ssim_min_size(3) == 33
    v = torch.rand(1, 1, 33, 34, 35, generator=g)
    assert abs(M.ms_ssim(v, v.clone(), data_range=1.0, win_size=3).item() - 1.0) < 1e-5
    other = M.ms_ssim(v, torch.rand(v.shape, generator=g), data_range=1.0, win_size=3)
    assert other.item() < 0.5


def test_ms_ssim_too_small_raises_with_needed_size():
    with pytest.raises(ValueError, match=r">= 161"):
        M.ms_ssim(torch.rand(1, 1, 64, 64), torch.rand(1, 1, 64, 64), data_range=1.0)
    # depth is checked too (pytorch_msssim itself only checks H and W)
    v = torch.rand(1, 1, 20, 40, 40)
    with pytest.raises(ValueError, match=r">= 33"):
        M.ms_ssim(v, v, data_range=1.0, win_size=3)


# ------------------------------------------------------------------------------------------ LPIPS


@pytest.fixture(scope="module")
def lpips_random():
    torch.manual_seed(0)
    return M.LPIPS(net="alex", random_backbone=True)


def test_lpips_random_backbone_basic(lpips_random):
    metric = lpips_random
    assert not metric.training
    assert all(not p.requires_grad for p in metric.parameters())
    metric.train()
    assert not metric.training and not metric.model.training
    g = _gen(8)
    x = torch.rand(3, 1, 64, 64, generator=g) * 2 - 1
    y = torch.rand(3, 1, 64, 64, generator=g) * 2 - 1
    same = metric(x, x.clone())
    diff = metric(x, y)
    assert same.shape == (3,) and diff.shape == (3,)
    assert torch.allclose(same, torch.zeros(3), atol=1e-6)
    assert (diff > 0).all()
    # normalize=True maps [0, 1] inputs to [-1, 1]
    assert torch.allclose(metric((x + 1) / 2, (y + 1) / 2, normalize=True), diff, atol=1e-5)
    # 1-channel == the same image repeated to 3 channels
    assert torch.allclose(metric(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)), diff, atol=1e-6)
    assert not diff.requires_grad


def test_lpips_3d_is_slice_average(lpips_random):
    g = _gen(9)
    x = torch.rand(2, 1, 3, 64, 64, generator=g) * 2 - 1
    y = torch.rand(2, 1, 3, 64, 64, generator=g) * 2 - 1
    out = lpips_random(x, y)
    assert out.shape == (2,)
    per_slice = torch.stack([lpips_random(x[:, :, d], y[:, :, d]) for d in range(3)], 1)
    assert torch.allclose(out, per_slice.mean(1), atol=1e-6)
    assert torch.allclose(lpips_random(x, x.clone()), torch.zeros(2), atol=1e-6)


def test_lpips_without_weights_is_unavailable():
    with pytest.raises(M.MetricUnavailable, match="alexnet-owt-7be5be79.pth") as err:
        M.LPIPS(net="alex")
    assert "backbone_weights=" in str(err.value)
    assert issubclass(M.MetricUnavailable, RuntimeError)
    with pytest.raises(M.MetricUnavailable, match="not found"):
        M.LPIPS(net="vgg", backbone_weights="/nonexistent/vgg16-397923af.pth")
    with pytest.warns(RuntimeWarning, match="squeezenet1_1-b8a52dc0.pth"):
        assert M.lpips_or_none(net="squeeze") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(M.lpips_or_none(net="squeeze", random_backbone=True), M.LPIPS)


def test_lpips_loads_local_torchvision_backbone(tmp_path, lpips_random):
    import torchvision

    torch.manual_seed(123)
    path = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)  # includes classifier.* keys
    loaded = M.LPIPS(net="alex", backbone_weights=path)
    expected = torch.load(path, weights_only=True)["features.3.weight"]
    assert torch.equal(getattr(loaded.model.net.slice2, "3").weight, expected)  # features.3 -> slice2.3
    g = _gen(10)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    out = loaded(x, y)
    assert out.shape == (2,) and (out > 0).all()
    assert not torch.allclose(out, lpips_random(x, y), atol=1e-4)
    assert torch.allclose(loaded(x, x.clone()), torch.zeros(2), atol=1e-6)

    wrong = tmp_path / "squeeze.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), wrong)
    with pytest.raises(ValueError, match="alexnet state dict"):
        M.LPIPS(net="alex", backbone_weights=wrong)


# ------------------------------------------------------------------------------------------ Dice / HD95


def _squares() -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    target = torch.zeros(1, 1, 12, 12, dtype=torch.long)
    pred[0, 0, 2:6, 2:6] = 1
    target[0, 0, 4:8, 4:8] = 1
    return pred, target


def test_dice_hand_computed_and_formats():
    from monai.metrics import compute_dice

    pred, target = _squares()
    d = M.dice(pred, target, num_classes=2)
    assert d.shape == (1, 1)
    assert abs(d.item() - 2 * 4 / (16 + 16)) < 1e-6  # overlap 2x2 of two 4x4 squares
    # (B, *spatial) label maps, one-hot floats and inferred num_classes give the same
    assert torch.allclose(M.dice(pred[:, 0], target[:, 0], num_classes=2), d)
    assert torch.allclose(M.dice(pred.float(), target.float()), d)
    assert torch.allclose(M.dice(pred, target), d)
    oh_p = torch.cat([1 - pred, pred], 1).float()
    oh_t = torch.cat([1 - target, target], 1).float()
    assert torch.allclose(M.dice(oh_p, target), d)
    assert torch.allclose(M.dice(oh_p, oh_t, include_background=True), compute_dice(oh_p, oh_t))


def test_dice_multiclass_equals_monai_and_nan_for_empty():
    from monai.metrics import compute_dice

    g = _gen(11)
    pred = torch.randint(0, 3, (2, 1, 10, 9, 8), generator=g)
    target = torch.randint(0, 3, (2, 1, 10, 9, 8), generator=g)
    target[1][target[1] == 2] = 0  # class 2 absent from sample 1's target
    ours = M.dice(pred, target, num_classes=4)
    ref = compute_dice(pred, target, include_background=False, num_classes=4)
    assert ours.shape == (2, 3)
    assert torch.allclose(ours, ref, equal_nan=True)
    assert torch.isnan(ours[1, 1]) and torch.isnan(ours[:, 2]).all()  # absent class 2 / never-used class 3
    mean = M.dice(pred, target, num_classes=4, reduction="mean")
    assert mean.shape == (3,) and abs(mean[0].item() - ours[:, 0].mean().item()) < 1e-6
    assert abs(mean[1].item() - ours[0, 1].item()) < 1e-6
    with pytest.raises(ValueError, match="labels must lie"):
        M.dice(pred, target, num_classes=2)


def test_hd95_shifted_square_anisotropic_spacing():
    from monai.metrics import compute_hausdorff_distance

    target = torch.zeros(1, 1, 20, 20, dtype=torch.long)
    target[0, 0, 4:12, 4:12] = 1
    rows = torch.roll(target, shifts=2, dims=2)
    cols = torch.roll(target, shifts=3, dims=3)
    spacing = (2.0, 0.5)
    assert abs(M.hd95(rows, target, spacing=spacing).item() - 2 * 2.0) < 1e-5
    assert abs(M.hd95(cols, target, spacing=spacing).item() - 3 * 0.5) < 1e-5
    assert abs(M.hd95(rows, target).item() - 2.0) < 1e-5
    oh = lambda t: torch.cat([1 - t, t], 1).float()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # MONAI-internal deprecation notice
        ref = compute_hausdorff_distance(oh(rows), oh(target), percentile=95, spacing=spacing)
    assert torch.allclose(M.hd95(rows, target, spacing=spacing), ref)

    vol = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    vol[0, 0, 3:8, 3:8, 3:8] = 1
    shifted = torch.roll(vol, shifts=2, dims=2)
    assert abs(M.hd95(shifted, vol, spacing=(3.0, 1.0, 1.0)).item() - 6.0) < 1e-5


def test_hd95_empty_class_is_nan():
    target = torch.zeros(2, 1, 10, 10, dtype=torch.long)
    pred = torch.zeros(2, 1, 10, 10, dtype=torch.long)
    target[0, 0, 2:5, 2:5] = 1
    pred[0, 0, 2:5, 2:5] = 1
    target[1, 0, 2:5, 2:5] = 1  # prediction empty in sample 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = M.hd95(pred, target, num_classes=2)
    assert out.shape == (2, 1)
    assert out[0, 0].item() == 0.0 and torch.isnan(out[1, 0])


# ------------------------------------------------------------------------------------------ Jacobian


def test_jacobian_zero_and_linear_fields():
    zero2 = torch.zeros(2, 2, 8, 9)
    zero3 = torch.zeros(1, 3, 5, 6, 7)
    assert torch.allclose(M.jacobian_determinant(zero2), torch.ones(2, 8, 9))
    assert torch.allclose(M.jacobian_determinant(zero3), torch.ones(1, 5, 6, 7))

    a = 0.3
    h = torch.arange(8.0)[:, None].expand(8, 9)
    u2 = torch.zeros(1, 2, 8, 9)
    u2[0, 0] = a * h  # displacement along axis 0 grows linearly along axis 0
    det2 = M.jacobian_determinant(u2)
    assert det2.shape == (1, 8, 9)
    assert torch.allclose(det2, torch.full_like(det2, 1 + a), atol=1e-6)

    coeffs = (0.2, -0.1, 0.5)
    grids = torch.meshgrid(*(torch.arange(float(s)) for s in (5, 6, 7)), indexing="ij")
    u3 = torch.stack([c * g for c, g in zip(coeffs, grids)])[None]
    det3 = M.jacobian_determinant(u3)
    expected = (1 + 0.2) * (1 - 0.1) * (1 + 0.5)
    assert torch.allclose(det3, torch.full_like(det3, expected), atol=1e-6)
    # displacements in mm with 2 mm voxels: gradient per mm is halved
    assert torch.allclose(
        M.jacobian_determinant(u2, spacing=2.0), torch.full_like(det2, 1 + a / 2), atol=1e-6
    )
    # shear does not change volume; rows then columns ordering is respected
    shear = torch.zeros(1, 2, 8, 9)
    shear[0, 1] = 0.7 * h  # displacement along axis 1 depends on axis 0
    assert torch.allclose(M.jacobian_determinant(shear), torch.ones(1, 8, 9), atol=1e-6)


def test_negative_jacobian_fraction():
    identity = torch.zeros(2, 2, 10, 10)
    assert torch.equal(M.negative_jacobian_fraction(identity), torch.zeros(2))
    h = torch.arange(10.0)[:, None].expand(10, 10)
    fold = torch.zeros(2, 2, 10, 10)
    fold[1, 0] = -2.0 * h  # det = 1 - 2 = -1 everywhere in sample 1
    frac = M.negative_jacobian_fraction(fold)
    assert frac.shape == (2,)
    assert frac[0].item() == 0.0 and frac[1].item() == 1.0
    # a local fold: a bump that pushes one region past its neighbour
    local = torch.zeros(1, 3, 8, 8, 8)
    local[0, 0, 3:5] = 3.0
    frac3 = M.negative_jacobian_fraction(local)
    assert 0 < frac3.item() < 1
    mask = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    mask[0, 0, 6:] = True  # far from the fold
    assert M.negative_jacobian_fraction(local, mask=mask).item() == 0.0


# ------------------------------------------------------------------------------------------ distributions


def _frechet_reference(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def test_frechet_distance():
    g = _gen(12)
    a = torch.randn(200, 4, generator=g, dtype=torch.float64)
    b = (
        0.5 * torch.randn(150, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g).double()
        + 1.0
    )
    same = M.frechet_distance(a, a)
    assert same.ndim == 0 and abs(same.item()) < 1e-6
    delta = torch.tensor([0.5, 0.0, -0.5, 0.0], dtype=torch.float64)
    shifted = M.frechet_distance(a, a + delta)
    assert abs(shifted.item() - 0.5) < 1e-6  # pure mean shift: ||delta||^2
    assert same.item() < shifted.item()
    ours = M.frechet_distance(a, b).item()
    assert ours == pytest.approx(_frechet_reference(a.numpy(), b.numpy()), rel=1e-6, abs=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        M.frechet_distance(a[:1], b)
    # fewer samples than features (singular covariances) stays finite and non-negative
    few = M.frechet_distance(a[:5, :3].repeat(1, 4), b[:6, :3].repeat(1, 4))
    assert torch.isfinite(few) and few.item() > 0


def test_frechet_distance_equals_monai_fid():
    from monai.metrics import FIDMetric

    g = _gen(15)
    a = torch.randn(80, 6, generator=g, dtype=torch.float64)
    b = torch.randn(90, 6, generator=g, dtype=torch.float64) * 1.3 + 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # MONAI passes scipy's deprecated `disp`
        try:
            ref = FIDMetric()(a, b).item()
        except TypeError as exc:  # a scipy that removed `disp`
            pytest.skip(f"monai FIDMetric incompatible with installed scipy: {exc}")
    assert M.frechet_distance(a, b).item() == pytest.approx(ref, rel=1e-8)


def test_mmd_linear_and_rbf():
    from monai.metrics import MMDMetric

    g = _gen(13)
    a = torch.randn(120, 8, generator=g, dtype=torch.float64)
    a2 = torch.randn(120, 8, generator=g, dtype=torch.float64)
    b = torch.randn(120, 8, generator=g, dtype=torch.float64) + 1.0
    for kernel in ("linear", "rbf"):
        same = M.mmd(a, a, kernel=kernel).item()
        resampled = M.mmd(a, a2, kernel=kernel).item()
        far = M.mmd(a, b, kernel=kernel).item()
        assert abs(same) < 0.05 * far and abs(resampled) < 0.05 * far
        assert far > 0
        assert abs(M.mmd(a, a, kernel=kernel, unbiased=False).item()) < 1e-10
    assert M.mmd(a, b, kernel="linear").item() == pytest.approx(MMDMetric()(a, b).item(), rel=1e-9)
    # linear biased MMD^2 is the squared distance of the means
    biased = M.mmd(a, b, kernel="linear", unbiased=False).item()
    assert biased == pytest.approx(((a.mean(0) - b.mean(0)) ** 2).sum().item(), rel=1e-9)
    # explicit bandwidth and unequal set sizes
    assert (
        M.mmd(a, b[:50], kernel="rbf", sigma=2.0).item() > M.mmd(a, a2[:50], kernel="rbf", sigma=2.0).item()
    )
    with pytest.raises(ValueError, match="kernel"):
        M.mmd(a, b, kernel="poly")


def test_extract_features_global_pools_maps():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 5, 3), torch.nn.Dropout(0.5))
    net.train()
    g = _gen(14)
    batches = [torch.rand(3, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)]
    feats = M.extract_features(net, [(b, "label") for b in batches])
    assert feats.shape == (5, 5) and not feats.requires_grad
    expected = torch.cat([net[0](b).mean((2, 3)) for b in batches]).detach()
    assert torch.allclose(feats, expected, atol=1e-6)  # eval mode: dropout off
    assert net.training  # mode restored
    vec = M.extract_features(lambda t: t.flatten(1), [{"image": b} for b in batches])
    assert vec.shape == (5, 64)
    with pytest.raises(ValueError, match="no batches"):
        M.extract_features(net, [])


def test_jacobian_forward_scheme():
    from medsynth_core.metrics import jacobian_determinant

    h, w = 6, 7
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    ddf = torch.stack([0.5 * yy, -0.25 * xx + 0.1 * yy])[None]  # u_H = 0.5 y, u_W = -0.25 x + 0.1 y
    det = jacobian_determinant(ddf, scheme="forward")
    assert det.shape == (1, h - 1, w - 1)
    # J = [[1.5, 0], [0.1, 0.75]] everywhere: forward differences are exact on linear fields
    torch.testing.assert_close(det, torch.full_like(det, 1.5 * 0.75))
    bumpy = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    central = jacobian_determinant(bumpy)
    forward = jacobian_determinant(bumpy, scheme="forward")
    assert forward.shape == (1, 4, 4) and not torch.allclose(central[:, :4, :4], forward)
    with pytest.raises(ValueError, match="scheme"):
        jacobian_determinant(bumpy, scheme="backward")

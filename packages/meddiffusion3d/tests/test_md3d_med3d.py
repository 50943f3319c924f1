"""Med3D feature extractor (MedicalNet 3D ResNet-50, shortcut B) and the official FID / MMD (spec §5)."""

import math

import pytest
import torch

from meddiffusion3d.evaluate import fid, med3d_resnet50, mmd, mmd_alpha_median
from meddiffusion3d.med3d import Med3DResNet50, Med3DWeightsError, load_med3d


def _bn(name: str, c: int) -> list:
    return [
        (f"{name}.weight", (c,)),
        (f"{name}.bias", (c,)),
        (f"{name}.running_mean", (c,)),
        (f"{name}.running_var", (c,)),
        (f"{name}.num_batches_tracked", ()),
    ]


def expected_medicalnet_resnet50_keys() -> list:
    """Key-and-shape list of MedicalNet ``resnet50(shortcut_type='B')`` without ``conv_seg``, written from the
    architecture: 7³ stem 1→64, Bottleneck ×(3, 4, 6, 3) at planes (64, 128, 256, 512), expansion 4, a
    1³ conv + BN shortcut on the first block of every layer (the channels change in all four)."""
    keys = [("conv1.weight", (64, 1, 7, 7, 7)), *_bn("bn1", 64)]
    inplanes = 64
    for li, (n, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            cin = inplanes if b == 0 else planes * 4
            keys += [(f"{p}.conv1.weight", (planes, cin, 1, 1, 1)), *_bn(f"{p}.bn1", planes)]
            keys += [(f"{p}.conv2.weight", (planes, planes, 3, 3, 3)), *_bn(f"{p}.bn2", planes)]
            keys += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1, 1)), *_bn(f"{p}.bn3", planes * 4)]
            if b == 0:
                keys += [
                    (f"{p}.downsample.0.weight", (planes * 4, cin, 1, 1, 1)),
                    *_bn(f"{p}.downsample.1", planes * 4),
                ]
        inplanes = planes * 4
    return keys


@pytest.fixture(scope="module")
def net():
    return Med3DResNet50().eval()


def test_key_and_shape_list_is_medicalnet_resnet50(net):
    got = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert got == expected_medicalnet_resnet50_keys()
    assert len(got) == 1 + 5 + 16 * 3 * 6 + 4 * 6  # 318 tensors: 53 bias-free convs, 53 BNs
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 46_155_072  # the ResNet-50 backbone (no seg head), BN affine included
    assert not any(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv3d))


def test_strides_dilations_and_2048_features(net):
    assert net.conv1.stride == (2, 2, 2) and net.conv1.padding == (3, 3, 3)
    assert net.layer2[0].conv2.stride == (2, 2, 2) and net.layer2[0].downsample[0].stride == (2, 2, 2)
    for layer, dil in ((net.layer1, 1), (net.layer2, 1), (net.layer3, 2), (net.layer4, 4)):
        for blk in layer:
            assert blk.conv2.dilation == (dil,) * 3 and blk.conv2.padding == (dil,) * 3
    for layer in (net.layer3, net.layer4):
        assert all(b.conv2.stride == (1, 1, 1) for b in layer) and layer[0].downsample[0].stride == (1, 1, 1)
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fmap = net.feature_map(x)
        f = net(x)
    assert fmap.shape == (2, 2048, 4, 4, 4)  # output stride 8 (conv1, maxpool, layer2), not 32
    assert f.shape == (2, 2048) and torch.allclose(f, fmap.mean(dim=(2, 3, 4)))


def test_loads_released_format_strictly(tmp_path, net):
    """The released file is ``{"state_dict": {"module.<key>": ...}}`` (DataParallel), no ``conv_seg``."""
    g = torch.Generator().manual_seed(1)
    sd = {
        k: (v + torch.randn(v.shape, generator=g) * 0.01 if v.is_floating_point() else v)
        for k, v in net.state_dict().items()
    }
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "resnet_50_23dataset.pth"
    )
    loaded = load_med3d(tmp_path / "resnet_50_23dataset.pth")
    assert not loaded.training
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 1, 16, 16, 16, generator=g)
    with torch.no_grad():
        assert torch.equal(med3d_resnet50(tmp_path / "resnet_50_23dataset.pth")(x), loaded(x))
    # a bare state dict with a conv_seg head (as a segmentation checkpoint) loads too, the head ignored
    torch.save({**sd, "conv_seg.0.weight": torch.zeros(2048, 32, 2, 2, 2)}, tmp_path / "bare.pth")
    assert torch.equal(load_med3d(tmp_path / "bare.pth").conv1.weight, sd["conv1.weight"])


def test_wrong_or_missing_weights_are_one_line_errors(tmp_path):
    with pytest.raises(Med3DWeightsError, match="Med3D weights not found") as e:
        load_med3d(tmp_path / "nope.pth")
    assert "\n" not in str(e.value) and "nope.pth" in str(e.value)
    # MONAI's resnet50 (stride-2 layer3/4, biased shortcut convs) is refused, not half-loaded
    from monai.networks.nets import resnet50

    monai_sd = resnet50(
        spatial_dims=3, n_input_channels=1, shortcut_type="B", feed_forward=False
    ).state_dict()
    sd = Med3DResNet50().state_dict()
    sd["layer4.2.conv3.weight"] = torch.zeros(2048, 512, 3, 3, 3)
    del sd["layer1.0.bn1.running_var"]
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    with pytest.raises(Med3DWeightsError, match="1 missing .*1 of wrong shape .*layer4.2.conv3.weight") as e:
        load_med3d(tmp_path / "bad.pth")
    assert "\n" not in str(e.value)
    torch.save(monai_sd, tmp_path / "monai.pth")
    try:
        load_med3d(tmp_path / "monai.pth")
    except Med3DWeightsError as err:
        assert "not MedicalNet's 3D ResNet-50" in str(err)
    else:
        pytest.fail("MONAI resnet50 weights loaded into the MedicalNet architecture")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Med3DWeightsError, match="not a readable torch checkpoint"):
        load_med3d(tmp_path / "junk.pth")


def test_fid_hand_computed():
    # 1-D: a = {0, 2} (mean 1, var 2), b = {1, 5} (mean 3, var 8): 4 + 2 + 8 - 2·sqrt(16) = 6
    assert fid(torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [5.0]])) == pytest.approx(6.0, abs=1e-9)
    # 2-D, diagonal covariances (2/3, 8/3) and 4× those, means 0 and (1, 1): 2 + 50/3 - 2·(4/3 + 16/3) = 16/3
    a = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    assert fid(a, 2 * a + 1) == pytest.approx(16 / 3, abs=1e-9)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_mmd_hand_computed_torch_two_sample():
    eps = 1e-5  # torch_two_sample pdist: sqrt(eps + |d²|)
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [3.0]])
    k = lambda d2: math.exp(-0.5 * (d2 + eps))  # noqa: E731
    # a00 = a11 = 1/(2·1), a01 = -1/(2·2): within-set off-diagonal pairs twice, cross pairs 4
    want = 0.5 * 2 * k(1) + 0.5 * 2 * k(9) - 2 * 0.25 * (k(0) + k(9) + k(1) + k(4))
    assert mmd(a, b, alphas=[0.5]) == pytest.approx(want, abs=1e-12)
    # median heuristic: pooled distinct-pair distances {0, 1, 1, 2, 3, 3} (+eps) → lower median 1 → alpha 1/(1+eps)
    assert mmd_alpha_median(a, b) == pytest.approx(1 / (1 + eps), rel=1e-9)
    al = 1 / (1 + eps)
    k = lambda d2: math.exp(-al * (d2 + eps))  # noqa: E731
    want = k(1) + k(9) - 0.5 * (k(0) + k(9) + k(1) + k(4))
    assert mmd(a, b) == pytest.approx(want, abs=1e-12)
    # unbiased: equal distributions score ~0 (possibly < 0), shifted ones clearly more
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    assert abs(mmd(x, y)) < 0.02 and mmd(x, y + 1.0) > 0.2

"""Med3D (MedicalNet) 3D ResNet-50, the FID/MMD feature extractor of the official evaluation (spec §5).

The architecture follows Tencent/MedicalNet ``models/resnet.py`` (``resnet50``, shortcut type B):

- stem: Conv3d 1→64, 7³, stride 2, padding 3, no bias → BN → ReLU → MaxPool 3³ stride 2 padding 1;
- Bottleneck blocks (1³ conv → 3³ conv with the block's stride and dilation, padding = dilation → 1³ conv
  to 4× planes, BN after each, ReLU, residual), counts (3, 4, 6, 3) at planes (64, 128, 256, 512);
- layer2 has stride 2; layer3 stride 1 with dilation 2; layer4 stride 1 with dilation 4 (every block of the
  layer, not only the first);
- shortcut B: a 1³ conv (stride of the block, no bias) + BN wherever the shape changes;
- no segmentation head: HA-GAN's evaluation replaces ``conv_seg`` by global average pooling + flatten, so
  a volume gives a 2048-d feature. The released ``resnet_50_23dataset.pth`` holds no ``conv_seg`` keys.

A 64³ input gives a 2048 × 8³ map (stride 8 overall) before pooling. Weights load strictly from a local
file (``{"state_dict": ...}`` with DataParallel's ``module.`` prefix, or a bare state dict); nothing is
downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from medsynth_core.cli import UserError

LAYERS = (3, 4, 6, 3)
PLANES = (64, 128, 256, 512)
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)
EXPANSION = 4
FEATURE_DIM = PLANES[-1] * EXPANSION  # 2048


class Med3DWeightsError(UserError, ValueError):
    """A Med3D weights file that is missing or does not match the architecture: one line, CLI exit 2."""


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        skip = x if self.downsample is None else self.downsample(x)
        return self.relu(out + skip)


class Med3DResNet50(nn.Module):
    """MedicalNet ResNet-50 backbone; ``forward`` returns the globally average-pooled (B, 2048) feature,
    ``feature_map`` the (B, 2048, D/8, H/8, W/8) map before pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = 64
        for i, (n, planes, stride, dil) in enumerate(zip(LAYERS, PLANES, STRIDES, DILATIONS), start=1):
            down = None
            if stride != 1 or inplanes != planes * EXPANSION:
                down = nn.Sequential(
                    nn.Conv3d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                    nn.BatchNorm3d(planes * EXPANSION),
                )
            blocks = [Bottleneck(inplanes, planes, stride, dil, down)]
            inplanes = planes * EXPANSION
            blocks += [Bottleneck(inplanes, planes, 1, dil) for _ in range(1, n)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        # MedicalNet's init (kaiming-normal fan_out convs, BN weight 1 / bias 0); pretrained weights replace it
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature_map(x).mean(dim=(2, 3, 4))


def load_med3d_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``resnet_50_23dataset.pth`` (or a bare state dict) from a local file, ``module.`` stripped."""
    p = Path(path)
    if not p.is_file():
        raise Med3DWeightsError(
            f"{p}: Med3D weights not found; download resnet_50_23dataset.pth from Tencent/MedicalNet "
            "(MedicalNet_pytorch_files2) yourself and pass its local path"
        )
    try:
        obj = torch.load(os.fspath(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise Med3DWeightsError(f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise Med3DWeightsError(f"{p}: expected a state dict (or {{'state_dict': ...}}) of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_med3d(path: str | os.PathLike) -> Med3DResNet50:
    """Build the backbone and load the weights strictly (every key and shape must match; a ``conv_seg``
    head, absent from the released file, is ignored), in eval mode."""
    net = Med3DResNet50()
    state = {k: v for k, v in load_med3d_state(path).items() if not k.startswith("conv_seg.")}
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} of wrong shape (e.g. {k} {tuple(state[k].shape)} != {tuple(expected[k].shape)})"
            )
        raise Med3DWeightsError(
            f"{path}: not MedicalNet's 3D ResNet-50 (shortcut B) state dict: " + "; ".join(parts)
        )
    net.load_state_dict(state, strict=True)
    return net.eval()

"""LPIPS, the learned perceptual distance, with backbones loaded from local files only."""

from __future__ import annotations

import os
import warnings
from typing import Literal

import torch

from medsynth_core.metrics._common import MetricUnavailable, Reduction, _check_pair, _reduce

# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------

# lpips net name -> (torchvision constructor, torchvision ImageNet weight file)
_LPIPS_BACKBONES = {
    "alex": ("alexnet", "alexnet-owt-7be5be79.pth"),
    "vgg": ("vgg16", "vgg16-397923af.pth"),
    "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth"),
}


class LPIPS(torch.nn.Module):
    """Learned perceptual distance (the ``lpips`` package, version 0.1 linear heads) -> ``(B,)``.

    The linear calibration heads ship inside the ``lpips`` pip package and are loaded from there.
    The backbone (torchvision AlexNet / VGG16 / SqueezeNet1.1 features) is *never* downloaded: it is
    built randomly initialised (``pnet_rand=True``) and then, if ``backbone_weights`` is given,
    filled from that local torchvision state-dict file (e.g. ``alexnet-owt-7be5be79.pth``).
    Without ``backbone_weights`` you must opt in to ``random_backbone=True`` (only meaningful for
    tests / smoke runs), otherwise :class:`MetricUnavailable` is raised.

    ``forward(x, y, normalize=False)``: inputs in [-1, 1] (``normalize=True`` maps [0, 1] inputs to
    [-1, 1]); 1-channel inputs are repeated to 3 channels; 3D inputs ``(B, C, D, H, W)`` are scored
    slice-wise along ``D`` (each ``(H, W)`` slice as a 2D image) and averaged per sample. The module
    is frozen, always in eval mode, and runs without gradients. At most ``chunk_size`` 2D images
    (samples x slices) go through the backbone at once.
    """

    chunk_size: int = 64

    def __init__(
        self,
        net: Literal["alex", "vgg", "squeeze"] = "alex",
        backbone_weights: str | os.PathLike[str] | None = None,
        random_backbone: bool = False,
        version: str = "0.1",
    ) -> None:
        super().__init__()
        if net not in _LPIPS_BACKBONES:
            raise ValueError(f"LPIPS: net must be one of {sorted(_LPIPS_BACKBONES)}, got {net!r}")
        tv_name, tv_file = _LPIPS_BACKBONES[net]
        if backbone_weights is None and not random_backbone:
            raise MetricUnavailable(
                f"LPIPS(net={net!r}) needs the torchvision ImageNet weights of its {tv_name} backbone, file "
                f"'{tv_file}' (https://download.pytorch.org/models/{tv_file}), which is never downloaded "
                f"automatically. Put that file on disk and pass LPIPS(net={net!r}, "
                f"backbone_weights='/path/to/{tv_file}'), or pass random_backbone=True for a "
                "non-perceptual smoke-test metric."
            )
        if backbone_weights is not None and not os.path.isfile(backbone_weights):
            raise MetricUnavailable(
                f"LPIPS(net={net!r}): backbone weight file not found: {os.fspath(backbone_weights)!r} "
                f"(expected a torchvision {tv_name} state dict such as '{tv_file}')"
            )
        try:
            import lpips as lpips_pkg
        except ImportError as exc:  # pragma: no cover - lpips is a declared dependency
            raise MetricUnavailable(f"LPIPS needs the 'lpips' package ({exc})") from exc

        head_file = os.path.join(os.path.dirname(lpips_pkg.__file__), "weights", f"v{version}", f"{net}.pth")
        if not os.path.isfile(head_file):
            raise MetricUnavailable(
                f"LPIPS: linear-head weights {head_file!r} missing from the lpips package"
            )
        with warnings.catch_warnings():
            # lpips 0.1.4 calls torchvision's deprecated ``pretrained=False``; pnet_rand=True means
            # ``weights=None``, so torchvision builds a random backbone and downloads nothing.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
            self.model = lpips_pkg.LPIPS(
                pretrained=True, net=net, version=version, pnet_rand=True, verbose=False, model_path=head_file
            )
        if backbone_weights is not None:
            self._load_backbone(backbone_weights, tv_name)
        self.net_name = net
        self.model.requires_grad_(False)
        self.train(False)

    def _load_backbone(self, path: str | os.PathLike[str], tv_name: str) -> None:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"LPIPS: {os.fspath(path)!r} does not contain a state dict")
        # lpips splits torchvision's ``features`` Sequential into slices that keep the original
        # indices as child names: ``net.sliceK.N.weight`` <- ``features.N.weight``.
        target = self.model.net.state_dict()
        mapping = {f"features.{key.split('.', 1)[1]}": key for key in target}
        provided = {key: value for key, value in state.items() if key.startswith("features.")}
        missing = sorted(set(mapping) - set(provided))
        unexpected = sorted(set(provided) - set(mapping))
        bad_shape = sorted(
            f"{k}: file {tuple(provided[k].shape)} vs model {tuple(target[mapping[k]].shape)}"
            for k in set(mapping) & set(provided)
            if tuple(provided[k].shape) != tuple(target[mapping[k]].shape)
        )
        if missing or unexpected or bad_shape:
            raise ValueError(
                f"LPIPS: {os.fspath(path)!r} is not a torchvision {tv_name} state dict matching "
                f"net={self.model.pnet_type!r}: missing keys {missing[:6]}, unexpected keys {unexpected[:6]}, "
                f"shape mismatches {bad_shape[:6]}"
            )
        self.model.net.load_state_dict({mapping[k]: v for k, v in provided.items()}, strict=True)

    def train(self, mode: bool = True) -> LPIPS:
        """Always stays in eval mode (the metric is frozen); ``mode`` is ignored."""
        return super().train(False)

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False, reduction: Reduction = "none"
    ) -> torch.Tensor:
        _check_pair(x, y, "LPIPS", ndims=(4, 5))
        channels = x.shape[1]
        if channels not in (1, 3):
            raise ValueError(f"LPIPS: expected 1 or 3 channels, got {channels}")
        param = next(self.model.parameters())
        x = x.to(device=param.device, dtype=param.dtype)
        y = y.to(device=param.device, dtype=param.dtype)
        batch = x.shape[0]
        depth = 1
        if x.ndim == 5:  # (B, C, D, H, W) -> (B*D, C, H, W), slices along D
            depth = x.shape[2]
            x = x.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, *x.shape[3:])
            y = y.permute(0, 2, 1, 3, 4).reshape(batch * depth, channels, *y.shape[3:])
        if channels == 1:
            x = x.expand(-1, 3, -1, -1)
            y = y.expand(-1, 3, -1, -1)
        step = max(1, int(self.chunk_size))
        scores = [
            self.model(x[i : i + step], y[i : i + step], normalize=normalize).reshape(-1)
            for i in range(0, x.shape[0], step)
        ]
        values = torch.cat(scores).reshape(batch, depth).mean(1)
        return _reduce(values, reduction)


def lpips_or_none(
    net: Literal["alex", "vgg", "squeeze"] = "alex",
    backbone_weights: str | os.PathLike[str] | None = None,
    random_backbone: bool = False,
    version: str = "0.1",
    device: str | torch.device | None = None,
) -> LPIPS | None:
    """Build :class:`LPIPS`, or warn (``warnings.warn``) and return ``None`` if it is unavailable."""
    try:
        metric = LPIPS(
            net=net, backbone_weights=backbone_weights, random_backbone=random_backbone, version=version
        )
    except MetricUnavailable as exc:
        warnings.warn(f"LPIPS skipped: {exc}", RuntimeWarning, stacklevel=2)
        return None
    return metric if device is None else metric.to(device)

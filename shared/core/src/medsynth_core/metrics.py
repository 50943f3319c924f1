"""Evaluation metrics shared by the medsynth packages.

Conventions used throughout:

* Images are torch tensors shaped ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D).
* Every intensity-dependent metric takes an explicit ``data_range`` (max - min of the
  intensity scale, e.g. ``1.0`` for [0, 1] images and ``2.0`` for [-1, 1] images); nothing is
  inferred from the data.
* Image metrics return one value per sample, shape ``(B,)`` (``reduction="none"``, the default),
  so callers average per slice / per volume instead of pooling errors over a batch.
  ``reduction="mean"`` returns the mean of those per-sample values.
* Segmentation metrics return ``(B, K')`` (one value per sample and class); their
  ``reduction="mean"`` is a NaN-aware mean over the batch, giving ``(K',)``.
* Distribution metrics (:func:`frechet_distance`, :func:`mmd`) compare two sets of feature
  vectors and return a 0-d tensor.

Only torch, monai, pytorch_msssim and (lazily) lpips are used at runtime. MONAI and lpips
are imported inside the functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import pytorch_msssim
import torch
import torch.nn.functional as F

__all__ = [
    "LPIPS",
    "MetricUnavailable",
    "dice",
    "extract_features",
    "frechet_distance",
    "hd95",
    "jacobian_determinant",
    "lpips_or_none",
    "mae",
    "mmd",
    "ms_ssim",
    "ms_ssim_min_size",
    "mse",
    "negative_jacobian_fraction",
    "psnr",
    "rmse",
    "ssim",
]

Reduction = Literal["none", "mean"]


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed in this environment (e.g. required weights are not on disk)."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str, ndims: Sequence[int] | None = None) -> None:
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        raise TypeError(f"{name}: expected torch tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.shape != y.shape:
        raise ValueError(
            f"{name}: inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if ndims is not None and x.ndim not in ndims:
        raise ValueError(
            f"{name}: expected (B, C, H, W) or (B, C, D, H, W) input, got shape {tuple(x.shape)}"
        )
    if x.ndim < 2:
        raise ValueError(f"{name}: expected a batch of at least 1-D samples (B, ...), got {tuple(x.shape)}")


def _as_float(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Promote both inputs to a common floating dtype (float32 for integer/bool inputs)."""
    dtype = torch.promote_types(x.dtype, y.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return x.to(dtype), y.to(dtype)


def _reduce(values: torch.Tensor, reduction: str, nan_aware: bool = False) -> torch.Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        if nan_aware:
            return torch.nanmean(values, dim=0)
        return values.mean()
    raise ValueError(f"reduction must be 'none' or 'mean', got {reduction!r}")


# ----------------------------------------------------------------------------------------------
# pixel-wise errors
# ----------------------------------------------------------------------------------------------


def mse(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "none") -> torch.Tensor:
    """Mean squared error per sample, averaged over all non-batch elements -> ``(B,)``."""
    _check_pair(x, y, "mse")
    x, y = _as_float(x, y)
    return _reduce((x - y).pow(2).flatten(1).mean(1), reduction)


def rmse(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "none") -> torch.Tensor:
    """Root mean squared error per sample (``sqrt`` of :func:`mse`) -> ``(B,)``."""
    return _reduce(mse(x, y).sqrt(), reduction)


def mae(x: torch.Tensor, y: torch.Tensor, reduction: Reduction = "none") -> torch.Tensor:
    """Mean absolute error per sample, averaged over all non-batch elements -> ``(B,)``.

    Not range-normalised: the value scales with the intensity range (MAE on [-1, 1] images is twice
    the MAE of the same images mapped to [0, 1]).
    """
    _check_pair(x, y, "mae")
    x, y = _as_float(x, y)
    return _reduce((x - y).abs().flatten(1).mean(1), reduction)


def psnr(
    x: torch.Tensor, y: torch.Tensor, data_range: float | torch.Tensor, reduction: Reduction = "none"
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per sample: ``10 * log10(data_range**2 / MSE)`` -> ``(B,)``.

    Same definition as ``skimage.metrics.peak_signal_noise_ratio`` applied to each sample, with the
    MSE taken over all non-batch elements (channels and spatial dims). ``data_range`` is a float or
    a per-sample tensor of shape ``(B,)``. Identical images (MSE = 0) give ``+inf``; with
    ``reduction="mean"`` a single identical pair therefore makes the mean ``+inf`` as well.
    """
    err = mse(x, y)
    dr = torch.as_tensor(data_range, dtype=err.dtype, device=err.device)
    if torch.any(dr <= 0):
        raise ValueError(f"psnr: data_range must be positive, got {data_range}")
    return _reduce(10.0 * torch.log10(dr**2 / err), reduction)


# ----------------------------------------------------------------------------------------------
# SSIM family
# ----------------------------------------------------------------------------------------------


def _box_mean_valid(t: torch.Tensor, win_size: int) -> torch.Tensor:
    """Separable ``win_size``-wide uniform mean over each spatial axis, no padding ('valid')."""
    nd = t.ndim - 2
    pool = F.avg_pool2d if nd == 2 else F.avg_pool3d
    for axis in range(nd):
        kernel = [1] * nd
        kernel[axis] = win_size
        t = pool(t, kernel_size=kernel, stride=1)
    return t


def _ssim_uniform(
    x: torch.Tensor, y: torch.Tensor, data_range: float, win_size: int, k: tuple[float, float]
) -> torch.Tensor:
    channels = x.shape[1]
    stats = _box_mean_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1), win_size)
    ux, uy, uxx, uyy, uxy = stats.split(channels, dim=1)
    n = win_size ** (x.ndim - 2)
    cov_norm = n / (n - 1.0)  # sample covariance, as skimage's use_sample_covariance=True
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (k[0] * data_range) ** 2
    c2 = (k[1] * data_range) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # mean over the valid region per channel, then over channels (skimage channel_axis behaviour)
    return s_map.flatten(2).mean(-1).mean(1)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    window: Literal["gaussian", "uniform"] = "gaussian",
    win_size: int | None = None,
    win_sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Structural similarity per sample (mean over the SSIM map, channels averaged) -> ``(B,)``.

    ``window="gaussian"`` (default) follows ``pytorch_msssim.ssim``: a separable Gaussian window of
    ``win_size=11`` taps with ``win_sigma=1.5``, constants ``K=(0.01, 0.03)``, population
    (biased) variances, and *valid* convolution, i.e. the SSIM map only covers positions where the
    whole window fits, so the mean is over the interior ``(H - win_size + 1) x (W - win_size + 1)``
    [x ``(D - win_size + 1)``] region. Works for 2D and 3D.

    ``window="uniform"`` reproduces ``skimage.metrics.structural_similarity`` defaults exactly:
    a ``7 x 7`` (2D) or ``7 x 7 x 7`` (3D) uniform window, ``K1=0.01``, ``K2=0.03``, sample
    covariance (``use_sample_covariance=True``, i.e. covariances scaled by ``N / (N - 1)``), and
    the mean SSIM over the image cropped by ``(win_size - 1) // 2`` on every side; channels are
    averaged as with ``channel_axis``.

    Every spatial dimension must be at least ``win_size``; ``win_size`` must be odd.
    """
    if window not in ("gaussian", "uniform"):
        raise ValueError(f"ssim: window must be 'gaussian' or 'uniform', got {window!r}")
    _check_pair(x, y, "ssim", ndims=(4, 5))
    x, y = _as_float(x, y)
    if data_range <= 0:
        raise ValueError(f"ssim: data_range must be positive, got {data_range}")
    if win_size is None:
        win_size = 11 if window == "gaussian" else 7
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be an odd integer >= 3, got {win_size}")
    spatial = tuple(x.shape[2:])
    if min(spatial) < win_size:
        raise ValueError(
            f"ssim: every spatial dimension must be >= win_size={win_size} ({window} window), "
            f"got spatial shape {spatial}; pass a smaller odd win_size"
        )
    if window == "gaussian":
        values = pytorch_msssim.ssim(
            x, y, data_range=data_range, size_average=False, win_size=win_size, win_sigma=win_sigma, K=k
        )
    else:
        values = _ssim_uniform(x, y, data_range, win_size, k)
    return _reduce(values, reduction)


_MS_SSIM_DEFAULT_LEVELS = 5


def ms_ssim_min_size(win_size: int = 11, levels: int = _MS_SSIM_DEFAULT_LEVELS) -> int:
    """Smallest spatial size :func:`ms_ssim` accepts: ``(win_size - 1) * 2**max(4, levels - 1) + 1``.

    pytorch_msssim downsamples ``levels - 1`` times by 2 and asserts that the in-plane sides exceed
    ``(win_size - 1) * 16``; here the same bound (or the stricter one for more than 5 levels) is
    applied to every spatial dimension, depth included, so no scale silently skips smoothing.
    """
    return (win_size - 1) * 2 ** max(4, levels - 1) + 1


def ms_ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float,
    weights: Sequence[float] | None = None,
    win_size: int = 11,
    win_sigma: float = 1.5,
    k: tuple[float, float] = (0.01, 0.03),
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Multi-scale SSIM per sample via ``pytorch_msssim.ms_ssim`` -> ``(B,)``; 2D and 3D.

    Default scale weights ``(0.0448, 0.2856, 0.3001, 0.2363, 0.1333)`` (5 scales), Gaussian
    window 11/1.5, ``K=(0.01, 0.03)``, valid convolution and 2x average-pool downsampling.
    Every spatial dimension must be at least :func:`ms_ssim_min_size` (161 for ``win_size=11``
    and 5 scales, 33 for ``win_size=3``); smaller inputs raise ``ValueError``.
    """
    _check_pair(x, y, "ms_ssim", ndims=(4, 5))
    x, y = _as_float(x, y)
    if data_range <= 0:
        raise ValueError(f"ms_ssim: data_range must be positive, got {data_range}")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"ms_ssim: win_size must be an odd integer >= 3, got {win_size}")
    levels = _MS_SSIM_DEFAULT_LEVELS if weights is None else len(weights)
    if levels < 1:
        raise ValueError("ms_ssim: weights must not be empty")
    need = ms_ssim_min_size(win_size, levels)
    spatial = tuple(x.shape[2:])
    if min(spatial) < need:
        raise ValueError(
            f"ms_ssim: input too small: every spatial dimension must be >= {need} for win_size={win_size} "
            f"and {levels} scales, got spatial shape {spatial}; use ssim() or a smaller win_size"
        )
    values = pytorch_msssim.ms_ssim(
        x,
        y,
        data_range=data_range,
        size_average=False,
        win_size=win_size,
        win_sigma=win_sigma,
        weights=None if weights is None else list(weights),
        K=k,
    )
    return _reduce(values, reduction)


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


# ----------------------------------------------------------------------------------------------
# segmentation overlap / surface distance (MONAI)
# ----------------------------------------------------------------------------------------------


def _to_onehot(t: torch.Tensor, num_classes: int | None, name: str) -> torch.Tensor:
    """Label map (integer dtype; ``(B, 1, *sp)`` or ``(B, *sp)``) or one-hot ``(B, K, *sp)`` -> one-hot."""
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        if not torch.all((t == 0) | (t == 1)):
            raise ValueError(
                f"{name}: floating/bool inputs are read as one-hot (B, K, *spatial) masks and must be 0/1; "
                "pass integer label maps as an integer dtype (e.g. .long())"
            )
        if t.ndim < 3:
            raise ValueError(f"{name}: expected (B, K, *spatial) one-hot masks, got {tuple(t.shape)}")
        t = t.float()
        if t.shape[1] == 1:  # single binary foreground channel -> (background, foreground)
            t = torch.cat([1.0 - t, t], dim=1)
        if num_classes is not None and t.shape[1] != num_classes:
            raise ValueError(f"{name}: one-hot input has {t.shape[1]} channels but num_classes={num_classes}")
        return t
    if t.ndim >= 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim not in (3, 4):
        raise ValueError(
            f"{name}: expected a label map (B, 1, *spatial) or (B, *spatial), got {tuple(t.shape)}"
        )
    if t.min() < 0 or t.max() >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes - 1}], got [{int(t.min())}, {int(t.max())}]"
        )
    return F.one_hot(t.long(), num_classes).movedim(-1, 1).float()


def _is_label_map(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype == torch.bool)


def _seg_pair(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if num_classes is None and (_is_label_map(pred) or _is_label_map(target)):
        onehot = [t for t in (pred, target) if not _is_label_map(t)]
        if onehot:
            num_classes = max(onehot[0].shape[1], 2)
        else:
            num_classes = max(int(pred.max()), int(target.max()), 1) + 1
    p = _to_onehot(pred, num_classes, "pred")
    t = _to_onehot(target, num_classes, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target one-hot shapes differ: {tuple(p.shape)} vs {tuple(t.shape)}")
    return p, t


def dice(
    pred: torch.Tensor,
    target: torch.Tensor,
    include_background: bool = False,
    num_classes: int | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Per-sample, per-class Dice via ``monai.metrics.compute_dice`` -> ``(B, K')``.

    Inputs: integer label maps ``(B, 1, *spatial)`` or ``(B, *spatial)`` (one-hot encoded with
    ``num_classes``; inferred as ``max label + 1`` when omitted, so pass it explicitly for stable
    class counts), or 0/1 float/bool one-hot masks ``(B, K, *spatial)`` (``K = 1`` is read as a
    binary foreground mask). ``K' = K - 1`` unless ``include_background``.

    NaN behaviour (MONAI ``ignore_empty=True``): a class absent from ``target`` gives NaN for that
    sample (whatever the prediction); present in target but absent in pred gives 0. Average with
    ``torch.nanmean``; ``reduction="mean"`` is the NaN-aware mean over the batch -> ``(K',)``.
    """
    from monai.metrics import compute_dice

    p, t = _seg_pair(pred, target, num_classes)
    values = compute_dice(p, t, include_background=include_background, ignore_empty=True)
    return _reduce(values, reduction, nan_aware=True)


def hd95(
    pred: torch.Tensor,
    target: torch.Tensor,
    spacing: float | Sequence[float] | None = None,
    include_background: bool = False,
    num_classes: int | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance per sample and class -> ``(B, K')``.

    ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=spacing)``: Euclidean
    distances between the boundary voxels of the two masks in both directions, in physical
    units when ``spacing`` (one value, or one per spatial axis in tensor order) is given, else in
    voxels. Input formats as in :func:`dice`.

    NaN behaviour (MONAI 1.6): a class empty in ``target`` or in ``pred`` (or both) gives NaN for
    that sample, with a MONAI warning. ``reduction="mean"`` is the NaN-aware mean over the batch.
    """
    from monai.metrics import compute_hausdorff_distance

    p, t = _seg_pair(pred, target, num_classes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        values = compute_hausdorff_distance(
            p, t, include_background=include_background, percentile=95, spacing=spacing
        )
    return _reduce(values, reduction, nan_aware=True)


# ----------------------------------------------------------------------------------------------
# deformation fields
# ----------------------------------------------------------------------------------------------


def jacobian_determinant(
    ddf: torch.Tensor,
    spacing: float | Sequence[float] | None = None,
    scheme: Literal["central", "forward"] = "central",
) -> torch.Tensor:
    """Jacobian determinant ``det(I + grad u)`` of a dense displacement field -> ``(B, *spatial)``.

    ``ddf`` is ``(B, ndim, *spatial)`` with ``ndim`` in {2, 3}; channel ``c`` is the displacement
    along spatial axis ``c`` (tensor order: ``(H, W)`` or ``(D, H, W)``). Without ``spacing`` the
    displacements are in voxels and derivatives are per voxel. With ``spacing`` (scalar or one value
    per axis) the displacements are taken to be in the same physical units as ``spacing`` and the
    derivatives are per physical unit. Derivatives use ``torch.gradient`` (central differences in
    the interior, one-sided first-order differences at the borders, ``edge_order=1``), so every
    spatial size must be >= 2. A zero field gives 1 everywhere; values <= 0 indicate folding.

    ``scheme="forward"`` uses forward differences ``u[i+1] - u[i]`` instead (as some registration
    losses do) and returns the ``(B, *(spatial - 1))`` grid where all of them are defined.
    """
    if ddf.ndim < 4:
        raise ValueError(f"jacobian_determinant: expected (B, ndim, *spatial), got {tuple(ddf.shape)}")
    nd = ddf.ndim - 2
    if nd not in (2, 3) or ddf.shape[1] != nd:
        raise ValueError(
            f"jacobian_determinant: a {nd}-D field needs {nd} displacement channels and nd in (2, 3); "
            f"got shape {tuple(ddf.shape)}"
        )
    if min(ddf.shape[2:]) < 2:
        raise ValueError(f"jacobian_determinant: every spatial size must be >= 2, got {tuple(ddf.shape[2:])}")
    if not ddf.dtype.is_floating_point:
        ddf = ddf.to(torch.get_default_dtype())
    if spacing is None:
        steps = [1.0] * nd
    elif isinstance(spacing, (int, float)):
        steps = [float(spacing)] * nd
    else:
        steps = [float(s) for s in spacing]
        if len(steps) != nd:
            raise ValueError(f"jacobian_determinant: spacing needs {nd} values, got {len(steps)}")
    if scheme == "central":
        grads = torch.gradient(ddf, spacing=steps, dim=tuple(range(2, 2 + nd)), edge_order=1)
    elif scheme == "forward":
        inner = (slice(None), slice(None)) + tuple(slice(0, n - 1) for n in ddf.shape[2:])
        grads = [(torch.diff(ddf, dim=2 + a) / steps[a])[inner] for a in range(nd)]
    else:
        raise ValueError(f"jacobian_determinant: scheme must be 'central' or 'forward', got {scheme!r}")
    # j[c][d] = d(x_c + u_c) / d x_d
    j = [[grads[d][:, c] + (1.0 if c == d else 0.0) for d in range(nd)] for c in range(nd)]
    if nd == 2:
        return j[0][0] * j[1][1] - j[0][1] * j[1][0]
    return (
        j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
        - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
        + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0])
    )


def negative_jacobian_fraction(
    ddf: torch.Tensor,
    mask: torch.Tensor | None = None,
    spacing: float | Sequence[float] | None = None,
    reduction: Reduction = "none",
) -> torch.Tensor:
    """Fraction of voxels with ``det(I + grad u) <= 0`` per sample -> ``(B,)``.

    ``mask`` (``(B, *spatial)`` or ``(B, 1, *spatial)``, nonzero = counted) restricts the count to a
    region; a sample with an empty mask gives NaN. See :func:`jacobian_determinant` for conventions.
    """
    det = jacobian_determinant(ddf, spacing=spacing)
    folded = (det <= 0).to(det.dtype)
    if mask is None:
        values = folded.flatten(1).mean(1)
    else:
        if mask.ndim == det.ndim + 1 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.shape != det.shape:
            raise ValueError(
                f"negative_jacobian_fraction: mask shape {tuple(mask.shape)} does not match {tuple(det.shape)}"
            )
        m = (mask != 0).to(det.dtype)
        values = (folded * m).flatten(1).sum(1) / m.flatten(1).sum(1)
    return _reduce(values, reduction)


# ----------------------------------------------------------------------------------------------
# distribution metrics over feature vectors
# ----------------------------------------------------------------------------------------------


def _check_feats(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name}: expected (N, F) and (M, F) feature matrices, got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"{name}: needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    return a.detach().double(), b.detach().double().to(a.device)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> torch.Tensor:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula) -> 0-d tensor.

    ``||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})`` with unbiased (N - 1)
    covariances, in float64 - the same quantity as ``monai.metrics.FIDMetric``. The trace of the
    matrix square root is computed as the sum of the square roots of the (clamped non-negative)
    eigenvalues of the symmetric PSD matrix ``S_a^{1/2} S_b S_a^{1/2}``, which is similar to
    ``S_a S_b``; this needs no scipy (MONAI's version calls ``scipy.linalg.sqrtm(..., disp=False)``,
    an argument scipy deprecates and schedules for removal in 1.18), never yields an imaginary
    part, and runs on any torch device. Inputs are ``(N, F)`` and ``(M, F)``; use
    :func:`extract_features` to obtain them. Values depend on the feature extractor and the sample
    sizes; only compare scores computed the same way.
    """
    a, b = _check_feats(feats_a, feats_b, "frechet_distance")
    f = a.shape[1]
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = torch.cov(a.T).reshape(f, f)
    cov_b = torch.cov(b.T).reshape(f, f)
    evals_a, evecs_a = torch.linalg.eigh(cov_a)
    sqrt_a = (evecs_a * evals_a.clamp_min(0).sqrt()) @ evecs_a.T
    inner = sqrt_a @ cov_b @ sqrt_a
    inner = 0.5 * (inner + inner.T)
    tr_covmean = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
    return (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2.0 * tr_covmean


def _pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min(0.0)


def mmd(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    kernel: Literal["linear", "rbf"] = "linear",
    sigma: float | None = None,
    unbiased: bool = True,
) -> torch.Tensor:
    """Squared maximum mean discrepancy between two feature sets ``(N, F)`` and ``(M, F)`` -> 0-d.

    ``unbiased=True`` (default) is the U-statistic
    ``mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)``; its expectation
    is 0 for equal distributions, so it can be slightly negative (and ``mmd(A, A)`` is small but
    not exactly 0). ``unbiased=False`` includes the diagonal terms (V-statistic): always >= 0 and
    exactly 0 for identical sets. Kernels: ``"linear"`` ``k(a, b) = a . b`` (for equal set sizes the
    unbiased value equals ``monai.metrics.MMDMetric`` with no ``y_mapping``, which works on
    flattened images rather than arbitrary feature sets) and ``"rbf"``
    ``k(a, b) = exp(-||a - b||^2 / (2 sigma^2))`` with ``sigma`` defaulting to the median pairwise
    distance of the pooled sets (evenly subsampled to 2000 points when larger). Computed in float64.
    """
    a, b = _check_feats(feats_a, feats_b, "mmd")
    if kernel == "linear":
        kaa, kbb, kab = a @ a.T, b @ b.T, a @ b.T
    elif kernel == "rbf":
        daa, dbb, dab = _pairwise_sq_dists(a, a), _pairwise_sq_dists(b, b), _pairwise_sq_dists(a, b)
        if sigma is None:
            pooled = torch.cat([a, b], 0)
            if pooled.shape[0] > 2000:  # bound the cost of the bandwidth heuristic
                pooled = pooled[torch.linspace(0, pooled.shape[0] - 1, 2000, device=pooled.device).long()]
            d = _pairwise_sq_dists(pooled, pooled)
            off = d[~torch.eye(d.shape[0], dtype=torch.bool, device=d.device)]
            sigma = float(off.sqrt().median())
            if sigma <= 0:
                sigma = 1.0
        if sigma <= 0:
            raise ValueError(f"mmd: sigma must be positive, got {sigma}")
        gamma = 1.0 / (2.0 * sigma**2)
        kaa, kbb, kab = torch.exp(-gamma * daa), torch.exp(-gamma * dbb), torch.exp(-gamma * dab)
    else:
        raise ValueError(f"mmd: kernel must be 'linear' or 'rbf', got {kernel!r}")
    n, m = a.shape[0], b.shape[0]
    if unbiased:
        term_a = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
        term_b = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    else:
        term_a = kaa.mean()
        term_b = kbb.mean()
    return term_a + term_b - 2.0 * kab.mean()


def extract_features(
    extractor: Callable[[torch.Tensor], Any],
    batches: Iterable[Any],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Run ``extractor`` over ``batches`` without gradients and stack the outputs -> ``(N, F)`` (on CPU).

    Each batch is a tensor, or a tuple/list whose first element is the image tensor (as yielded by
    many data loaders), or a dict with an ``"image"`` key. An ``nn.Module`` extractor is put in eval
    mode for the call (its previous mode is restored). Outputs that are feature maps
    ``(N, F, *spatial)`` are reduced by global average pooling; a tuple/list output uses its first
    element; ``(N,)`` outputs become ``(N, 1)``.
    """
    was_training = isinstance(extractor, torch.nn.Module) and extractor.training
    if isinstance(extractor, torch.nn.Module):
        extractor.eval()
    feats: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for batch in batches:
                if isinstance(batch, dict):
                    batch = batch["image"]
                elif isinstance(batch, (tuple, list)):
                    batch = batch[0]
                out = extractor(batch.to(device))
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if out.ndim == 1:
                    out = out[:, None]
                elif out.ndim > 2:
                    out = out.flatten(2).mean(-1)
                feats.append(out.detach().cpu())
    finally:
        if was_training:
            extractor.train()
    if not feats:
        raise ValueError("extract_features: no batches were given")
    return torch.cat(feats, 0)

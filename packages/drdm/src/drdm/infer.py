"""Recovery sampling (spec section 4, Alg. 2/3) and the NIfTI augmentation driver (``drdm augment``)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import checkpoint as C
from medsynth_core.cli import UserError
from medsynth_core.io import MedicalImage, MedicalIOError, read_image, warn_if_constant, write_image

from .config import DRDMConfig, build_diffusion, build_network
from .data import is_dicom_series, list_inputs, minmax, read_input, resize, to_tensor_layout
from .deform import DeformationDiffusion, compose, warp

log = logging.getLogger("drdm.infer")
LABEL_MODES = ("nearest", "linear_onehot_argmax", "image")
KIND = "drdm"  # checkpoint kind of our trained network


def load_network(
    path: str | Path, cfg: DRDMConfig | None = None, map_location: str = "cpu", use_ema: bool = True
):
    """Network (eval mode) and config from one of our checkpoints; the config saved in it wins. A checkpoint
    trained with ``train.ema_decay > 0`` gives its EMA weights (``use_ema=False``: the raw ones)."""
    from medsynth_core.config import config_from_dict

    ckpt = C.load_checkpoint(path, kind=KIND, map_location=map_location)
    if ckpt.get("config") is not None:
        cfg = config_from_dict(DRDMConfig, ckpt["config"], source=f"{path} [config]")
    if cfg is None:
        raise UserError(f"{path}: holds no config; pass --config")
    net = build_network(cfg)
    ema = (ckpt.get("emas") or {}).get("network") if use_ema else None
    if ema is not None:
        C.load_module_state(net, ema["module"], source=f"{path} [ema]")
    else:
        C.load_module_state(net, ckpt["models"]["network"], source=str(path))
    return net.eval(), cfg


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer map ``[B, *S]`` -> float one-hot ``[B, n_classes, *S]`` (background = channel 0)."""
    oh = F.one_hot(labels.long(), n_classes)
    return oh.movedim(-1, 1).float()


def warp_labels(
    onehot: torch.Tensor,
    u: torch.Tensor,
    label_mode: str = "nearest",
    resample_mode: str = "bilinear",
    padding_mode: str = "zeros",
    warp_fn=warp,
) -> torch.Tensor:
    """Warp label maps. ``nearest``: nearest-neighbour on the one-hot (binary, sums to one; voxels mapped from
    outside the image become background). ``linear_onehot_argmax``: linear warp then arg-max. ``image``: the
    official behaviour (Q4): the image interpolator with zero padding, soft and possibly outside [0, 1]."""
    if label_mode == "image":
        return warp_fn(onehot, u, mode=resample_mode, padding_mode=padding_mode)
    if label_mode == "nearest":
        out = warp_fn(onehot, u, mode="nearest", padding_mode="zeros")
        out[:, 0] += (out.sum(1) == 0).to(out.dtype)
        return out
    if label_mode == "linear_onehot_argmax":
        out = warp_fn(onehot, u, mode="bilinear", padding_mode="zeros")
        out[:, 0] += 1.0 - out.sum(1)
        return one_hot(out.argmax(1), onehot.shape[1])
    raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")


@dataclass
class Recovery:
    phi: torch.Tensor  # final deformation phi (fractions of S)
    psi_rand: torch.Tensor  # random forward deformation at T'
    image: torch.Tensor  # W(I_0, phi)
    noisy: torch.Tensor  # W(I_0, psi_rand)
    labels: torch.Tensor | None = None
    noisy_labels: torch.Tensor | None = None
    snapshots: list[torch.Tensor] | None = None


@torch.no_grad()
def recover(
    net: torch.nn.Module,
    diffusion: DeformationDiffusion,
    x0: torch.Tensor,
    t_start: int | Sequence[int],
    labels: torch.Tensor | None = None,
    timesteps: int = 80,
    rec_num: int = 2,
    padding_mode: str = "zeros",
    reverse_from_start: bool = False,
    label_mode: str = "nearest",
    t_save: Sequence[int] = (),
) -> Recovery:
    """``diff_recover``: deform ``x0`` to level ``t_start`` (Psi_rand), then for t = T-1..0 (or T'-1..0 with
    ``reverse_from_start``, Q3) compose the predicted recovery ``phi <- phi ⊕ psi_hat`` and resample the
    **original** ``x0`` (no blur accumulation). ``labels`` is a one-hot ``[B, C, *S]``."""
    b = x0.shape[0]
    starts = [int(v) for v in (t_start if isinstance(t_start, (list, tuple)) else [t_start] * b)]
    if len(starts) != b:
        raise ValueError(f"{len(starts)} start levels for a batch of {b}")
    if reverse_from_start and len(set(starts)) > 1:
        raise ValueError("reverse_from_start needs one start level per batch")
    t_vec = torch.tensor(starts, dtype=torch.long)
    noisy, _, psi_rand = diffusion(x0, t_vec)
    mode, pad = diffusion.resample_mode, diffusion.img_pad_mode
    phi = psi_rand.clone()
    img = noisy
    snaps = []
    first = (starts[0] if reverse_from_start else int(timesteps)) - 1
    for i in range(first, -1, -1):
        psi = net(img, torch.full((b,), i, dtype=torch.long, device=x0.device), rec_num=rec_num)
        phi = compose(phi, psi, padding_mode=padding_mode)
        img = warp(x0, phi, mode=mode, padding_mode=pad)
        if i in t_save:
            snaps.append(img)
    out = Recovery(phi, psi_rand, img, noisy, snapshots=snaps)
    if labels is not None:
        out.noisy_labels = warp_labels(labels, psi_rand, label_mode, mode, pad)
        out.labels = warp_labels(labels, phi, label_mode, mode, pad)
    return out


def noise_steps(start: int, step: int, count: int, timesteps: int = 80) -> list[int]:
    """T' of each sample: DRDM_augment adds ``noise_step`` after sample k when (k - start) is even
    (CMR: 48,50,50,52,...,78,78,80), capped at T."""
    out, cur = [], start
    for k in range(count):
        out.append(min(cur, timesteps))
        if (k - start) % 2 == 0:
            cur += step
    return out


# --------------------------------------------------------------------------- mapping back to the input grid
def warp_voxels(
    x: torch.Tensor, d: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Warp ``x`` ``[B, C, *N]`` by a displacement ``d`` ``[B, nd, *N]`` in voxels (any, non-square shape)."""
    nd = d.shape[1]
    shape = d.shape[2:]
    axes = [torch.arange(int(s), device=d.device, dtype=d.dtype) for s in shape]
    ref = torch.stack(torch.meshgrid(axes, indexing="ij"), 0)[None]
    half = torch.tensor([(s - 1) / 2.0 for s in shape], dtype=d.dtype, device=d.device).reshape(
        [1, nd] + [1] * nd
    )
    grid = ((ref + d) / half - 1).movedim(1, -1).flip(-1)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode=padding_mode, align_corners=True)


def field_to_grid(phi: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Field in fractions of S on the S^nd grid -> voxel displacement on the input grid ``shape`` (resize
    geometry of the image resize: pixel centres, align_corners=False)."""
    nd = phi.shape[1]
    s = phi.shape[2]
    vox = phi * float(s)
    mode = "bilinear" if nd == 2 else "trilinear"
    if tuple(int(n) for n in shape) != tuple(phi.shape[2:]):
        vox = F.interpolate(vox, list(shape), mode=mode, align_corners=False)
    scale = torch.tensor([n / s for n in shape], dtype=vox.dtype, device=vox.device).reshape(
        [1, nd] + [1] * nd
    )
    return vox * scale


def _find_label(image: Path, label_dir: Path) -> Path:
    """The label of ``image`` in ``label_dir``: same name, or ``<stem>_gt`` / ``_seg`` / ``_label`` / ``_GT``
    with the image's extension or as NIfTI; a DICOM series folder of the same name also counts."""
    name = image.name
    stem = _stem(image)
    exts = [name[len(stem) :]] if not image.is_dir() else []
    exts += [e for e in (".nii.gz", ".nii") if e not in exts]
    cands = [name] + [f"{stem}{suf}{ext}" for suf in ("_gt", "_seg", "_label", "_GT") for ext in exts]
    for cand in cands:
        p = label_dir / cand
        if p.is_file() or (p.is_dir() and is_dicom_series(p)):
            return p
    raise UserError(
        f"{image}: no label file in {label_dir} (looked for {', '.join(cands[:5])}, ...); give every image a "
        "label or drop --labels"
    )


def _stem(p: Path) -> str:
    if p.is_dir():
        return p.name
    return p.name[:-7] if p.name.endswith(".nii.gz") else p.stem


def _random_permute(tensors: list[torch.Tensor], nd: int) -> list[torch.Tensor]:
    """utils.random_permute: shuffle the spatial axes and flip each with p=0.5 (python RNG; Q13)."""
    select = [-1, -2, -3][:nd]
    axes = list(range(tensors[0].ndim))
    chosen = [axes[d] for d in select]
    random.shuffle(chosen)
    for i, d in enumerate(select):
        axes[d] = chosen[i]
        if random.choice([True, False]):
            tensors = [torch.flip(x, [d]) for x in tensors]
    return [x.permute(axes).contiguous() for x in tensors]


@torch.no_grad()
def augment_units(
    net: torch.nn.Module,
    cfg: DRDMConfig,
    image: np.ndarray,
    labels: np.ndarray | None,
    n_classes: int,
    device: torch.device | str = "cpu",
) -> list[dict]:
    """Augment one 2D slice or 3D volume (in its own grid) ``aug_coe`` times; returns per-sample arrays.

    Without ``random_permute`` the samples run as batches of ``augment.batch_size`` (one network call per level
    for the whole batch); with it, one by one as the official script does."""
    a, d = cfg.augment, cfg.diffusion
    nd = cfg.model.ndims
    diffusion = build_diffusion(cfg, sampling=True)
    orig = torch.from_numpy(np.asarray(image, np.float32))[None, None].to(device)
    lab = (
        one_hot(torch.from_numpy(np.asarray(labels))[None], n_classes).to(device)
        if labels is not None
        else None
    )
    steps = noise_steps(a.start_noise_step, a.noise_step, a.aug_coe, d.timesteps)
    chunk = 1 if a.random_permute else max(1, a.batch_size)
    mode = d.resample_mode if nd == 2 else "bilinear"
    outs: list[dict] = []
    chunks: list[list[int]] = []
    for t in steps:  # batches of `chunk`; with reverse_from_start one T' per batch
        if not chunks or len(chunks[-1]) >= chunk or (a.reverse_from_start and chunks[-1][0] != t):
            chunks.append([])
        chunks[-1].append(t)
    c0 = 0
    for t_starts in chunks:
        b = len(t_starts)
        if a.random_permute:
            if len(set(orig.shape[2:])) != 1:
                raise UserError(
                    "augment.random_permute needs square/cubic inputs; set augment.random_permute=false"
                )
            orig, lab = (
                _random_permute([orig, lab], nd)
                if lab is not None
                else (_random_permute([orig], nd)[0], None)
            )
        x = minmax(resize(orig[0], d.img_size))[None].expand(b, *([-1] * (nd + 1)))
        lab_s = None
        if lab is not None:
            lab_s = one_hot(resize(lab[0].argmax(0, keepdim=True), d.img_size, "label")[0][None], n_classes)
            lab_s = lab_s.expand(b, *([-1] * (nd + 1)))
        rec = recover(
            net,
            diffusion,
            x.contiguous(),
            t_starts,
            lab_s,
            d.timesteps,
            cfg.model.rec_num,
            d.padding_mode,
            a.reverse_from_start,
            a.label_mode,
        )
        shape = orig.shape[2:]
        phi = field_to_grid(rec.phi, shape)
        psi = field_to_grid(rec.psi_rand, shape)
        big = orig.expand(b, *([-1] * (nd + 1)))
        image_out = warp_voxels(big, phi, mode, d.img_pad_mode)
        noisy_out = warp_voxels(big, psi, mode, d.img_pad_mode)
        if lab is not None:
            lab_b = lab.expand(b, *([-1] * (nd + 1)))
            oh = warp_labels(lab_b, phi, a.label_mode, mode, d.img_pad_mode, warp_fn=warp_voxels)
            noh = warp_labels(lab_b, psi, a.label_mode, mode, d.img_pad_mode, warp_fn=warp_voxels)
        for j, t_start in enumerate(t_starts):
            item = {
                "k": c0 + j,
                "t_start": t_start,
                "ddf": phi[j],
                "psi_ddf": psi[j],
                "phi_norm": rec.phi[j],
                "psi_norm": rec.psi_rand[j],
                "image": image_out[j, 0],
                "noisy": noisy_out[j, 0],
                "original": orig[0, 0].clone(),
            }
            if lab is not None:
                item.update(onehot=oh[j], noisy_onehot=noh[j], original_labels=lab[0].argmax(0))
            outs.append(item)
        c0 += b
    return outs


def _label_out(onehot: torch.Tensor, mode: str) -> np.ndarray:
    """Integer label map for binary modes; the soft channels (last axis) for the official 'image' mode."""
    if mode == "image":
        return onehot.movedim(0, -1).cpu().numpy().astype(np.float32)
    return onehot.argmax(0).cpu().numpy().astype(np.int16)


def augment_folder(
    net: torch.nn.Module,
    cfg: DRDMConfig,
    images: str | Path,
    out: str | Path,
    labels: str | Path | None = None,
    device: str = "cpu",
    limit: int | None = None,
) -> dict:
    """``drdm augment``: for every image (every z-slice in 2D mode) write ``aug_coe`` deformed images,
    deformed labels and DDFs (voxels, components along the disk axes i, j[, k]) as NIfTI with the input's affine."""
    a, nd = cfg.augment, cfg.model.ndims
    try:
        files = list_inputs(images)
    except MedicalIOError as exc:
        raise UserError(str(exc)) from exc
    if limit:
        files = files[:limit]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    written: list[str] = []
    preview = None
    for f in files:
        img = read_input(f)
        arr = to_tensor_layout(img.array)
        warn_if_constant(arr, str(f), "min-max normalisation gives an all-zero image")
        lab_arr = None
        if labels is not None:
            lf = _find_label(f, Path(labels))
            lab_img = read_image(lf, dtype=None)
            lab_arr = np.rint(np.asarray(lab_img.array, np.float64)).astype(np.int64)
            if lab_arr.shape != arr.shape:
                raise UserError(f"{lf}: label shape {lab_arr.shape} differs from image {f} shape {arr.shape}")
            if lab_arr.min() < 0:
                raise UserError(f"{lf}: negative label values; labels must be integers 0..C-1")
        n_classes = int(lab_arr.max()) + 1 if lab_arr is not None else 0
        n_classes = max(n_classes, 2)
        affine = img.affine if a.keep_affine else np.eye(4)
        if nd == 2 and arr.ndim == 3:
            units = [
                (arr[..., z], None if lab_arr is None else lab_arr[..., z]) for z in range(arr.shape[-1])
            ]
            stacked = True
        elif arr.ndim == nd:
            units = [(arr, lab_arr)]
            stacked = False
        else:
            raise UserError(
                f"{f}: image of shape {arr.shape} does not fit model.ndims={nd} "
                "(2D: 2D images or stacks of slices; 3D: volumes)"
            )
        per_unit = [augment_units(net, cfg, u, lu, n_classes, device) for u, lu in units]
        stem = _stem(f)

        def put(arrays: list[np.ndarray], name: str, n_spatial: int, stacked=stacked, affine=affine) -> None:
            data = np.stack(arrays, axis=2) if stacked else arrays[0]
            write_image(MedicalImage(data, affine, n_spatial), out / name)
            written.append(name)

        sp = 3 if stacked else nd
        put([u[0].astype(np.float32) for u in units], f"{stem}_ORG_NA.nii.gz", sp)
        if lab_arr is not None:  # Q11 fix: the original _GT file holds the mask
            put([u[1].astype(np.int16) for u in units], f"{stem}_ORG_NA_GT.nii.gz", sp)
        for k in range(a.aug_coe):
            items = [p[k] for p in per_unit]
            tag = f"{stem}_AugImg{k:04d}_NoiseStep{items[0]['t_start']:04d}"
            noisy_tag = f"{stem}_NoiseImg{k:04d}_NoiseStep{items[0]['t_start']:04d}"
            put([it["image"].cpu().numpy() for it in items], f"{tag}.nii.gz", sp)
            if a.save_ddf:
                put([it["ddf"].movedim(0, -1).cpu().numpy() for it in items], f"{tag}_DDF.nii.gz", sp)
            if a.save_noisy:
                put([it["noisy"].cpu().numpy() for it in items], f"{noisy_tag}.nii.gz", sp)
            if lab_arr is not None:
                put([_label_out(it["onehot"], a.label_mode) for it in items], f"{tag}_GT.nii.gz", sp)
                if a.save_noisy:
                    put(
                        [_label_out(it["noisy_onehot"], a.label_mode) for it in items],
                        f"{noisy_tag}_GT.nii.gz",
                        sp,
                    )
        if preview is None:
            preview = per_unit[len(per_unit) // 2]
    if preview is not None:
        save_augment_preview(out / "preview.png", preview)
    return {"files": len(files), "written": written, "preview": preview}


def save_augment_preview(path: Path, items: list[dict]) -> None:
    from medsynth_core.viz import label_overlay, save_grid

    def mid(v: torch.Tensor) -> np.ndarray:
        v = v.detach().float().cpu().numpy()
        return v[v.shape[0] // 2] if v.ndim == 3 else v

    row_img = [mid(items[0]["original"])] + [mid(it["image"]) for it in items[:5]]
    rows, titles = [row_img], [["input"] + [f"T'={it['t_start']}" for it in items[:5]]]
    if "onehot" in items[0]:
        ov = [label_overlay(mid(items[0]["original"]), mid(items[0]["original_labels"]))]
        ov += [label_overlay(mid(it["image"]), mid(it["onehot"].argmax(0))) for it in items[:5]]
        rows.append(ov)
        titles.append([None] * len(ov))
    save_grid(path, rows, titles=titles)

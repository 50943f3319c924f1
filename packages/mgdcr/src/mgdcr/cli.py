"""Command line: ``mgdcr VERB`` (train, encode, reconstruct, evaluate, demo, summary, convert-official)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from medsynth_core.cli import (
    UserError,
    Verb,
    demo_arguments,
    emit,
    run_cli,
    summary_verb,
    train_verb,
)

PROG = "mgdcr"
DESCRIPTION = (
    "Multi-view-guided diffusion for cardiac volume reconstruction "
    "(DiffAE prior + LAX-guided inverse optimisation)"
)


def _load_cfg(args: argparse.Namespace):
    from medsynth_core.config import config_file, load_config

    from .config import Config

    return load_config(Config, config_file(args.config, __file__), args.overrides)


# ------------------------------------------------------------------------------------------------ train
def _run_train(cfg, args: argparse.Namespace) -> dict:
    from .train import train, train_latent

    if cfg.latent.enabled:  # the latent DDIM of z_sem (spec §1.4) on a trained prior
        return {"run_dir": str(train_latent(cfg, resume=args.resume))}
    report: dict = {}
    run_dir = train(cfg, resume=args.resume, report=report)
    return {"run_dir": str(run_dir), **report}


def _add_encode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="mgdcr checkpoint (EMA weights are used)")
    p.add_argument("--input", required=True, help="3D (Z,H,W) or 4D cine SAX NIfTI")
    p.add_argument("--frame", type=int, default=0)
    p.add_argument("--steps", type=int, default=30, help="DDIM steps of the stochastic encoding (ddimN)")
    p.add_argument("--out", required=True, help="output .pt with x_T (n,1,H,W) and z_sem (n,Z)")
    p.add_argument("--device", default="auto")
    _add_n4_flag(p)


def _encode(args: argparse.Namespace) -> int:
    import torch

    from medsynth_core.atomic import check_output_path
    from medsynth_core.checkpoint import atomic_torch_save
    from medsynth_core.distributed import resolve_device

    from .diffusion import GaussianDiffusion
    from .infer import DiffAEPrior, load_prior

    check_output_path(args.out, folder=False, what="--out")  # before loading anything (issue 18)
    dev = resolve_device(args.device)
    model, cfg = load_prior(args.checkpoint, dev)
    x, _, _ = _load_sax(args.input, args.frame, cfg, n4=cfg.inverse.n4 and not args.no_n4)
    d = GaussianDiffusion(cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
    prior = DiffAEPrior(model, d, args.steps, args.steps, flip_h=cfg.inverse.flip_h)
    xt, z = prior.encode(torch.as_tensor(x, dtype=torch.float32, device=dev))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"x_T": xt.cpu(), "z_sem": z.cpu(), "steps": args.steps}, args.out)
    emit(args, {"written": str(args.out), "x_T": list(xt.shape), "z_sem": list(z.shape)})
    return 0


def _add_n4_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-n4",
        action="store_true",
        help="skip the N4 bias-field correction (SimpleITK) of the SAX cine and the LAX images, which the "
        "official inference applies (= inverse.n4=false)",
    )


def _load_sax(path, frame: int, cfg, n4: bool):
    """One SAX frame as the official inference prepares it (ex8 L161-176): N4 of the cine (SimpleITK, per
    frame: it has no 4D N4; the fork runs ANTs on the 4D array), clip to [0, p98 of the 4D array] / p98.
    Returns ``(frame in [0, 1], the raw frame before N4, (s,h,w) affine)``."""
    import numpy as np

    from .data import load_cine
    from .infer import n4_correct, percentile_normalise

    arr, aff = load_cine(path)
    _check_frame(path, arr, frame)
    raw = arr[frame].copy()
    if n4:
        arr = np.stack([n4_correct(f) for f in arr])
    x = percentile_normalise(arr, cfg.data.percentile, cfg.data.include_zeros_in_percentile)[frame]
    _check_size(path, x, cfg.model.image_size, single_frame=arr.shape[0] == 1)
    return x, raw, aff


def _check_frame(path, arr, frame) -> None:
    if not 0 <= frame < arr.shape[0]:
        raise UserError(f"{path}: frame {frame} out of range (the file has {arr.shape[0]} frames)")


def _check_size(path, x, size, single_frame: bool = False) -> None:
    if x.shape[-2:] != (size, size):
        if single_frame:  # issue 18: a 3D file (e.g. x, y, time) otherwise reads as a slice-size mismatch
            raise UserError(
                f"{path}: a 3D file is read as one frame of {x.shape[0]} slices of {x.shape[-2]}x{x.shape[-1]}, "
                f"but the model expects {size}x{size} slices; pass the 4D SAX cine (x, y, slice, time) "
                "or a 3D frame (x, y, slice) cropped/resampled around the heart"
            )
        raise UserError(
            f"{path}: slices are {x.shape[-2]}x{x.shape[-1]} but the model expects {size}x{size}; "
            "crop/resample around the heart first"
        )


# ------------------------------------------------------------------------------------------------ reconstruct
def _add_reconstruct(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="mgdcr checkpoint (EMA weights are used)")
    p.add_argument("--sax", required=True, help="4D (or 3D) SAX cine NIfTI")
    p.add_argument("--lax", nargs="*", default=[], help="LAX NIfTIs (2ch/3ch/4ch; 2D, (i,j,1) or (i,j,1,T))")
    p.add_argument("--lax-volume", default=None, help="fork data: LAX intensities on the dense grid (D,H,W)")
    p.add_argument("--lax-mask", default=None, help="fork data: plane/ROI mask on the dense grid (D,H,W)")
    p.add_argument("--frame", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--heldout",
        type=int,
        default=None,
        metavar="SEED",
        help="ex10 held-out protocol instead of a full reconstruction: drop a seeded middle SAX slice, fill "
        "2K-1 slices between its neighbours and score linear/nearest/DiffAE seed/DiffAE+LAX on it (JSON), "
        "with ex10's settings (lambda_lax 6, lambda_smooth 3, lr 1e-3, no N4, end slices frozen) under any "
        "inverse.* overrides",
    )
    _add_n4_flag(p)
    p.add_argument(
        "--amp",
        choices=("off", "fp16", "bf16"),
        default=None,
        help="mixed precision of the inverse optimisation on CUDA (default inverse.amp: fp16 autocast + "
        "GradScaler, as the official); ignored on CPU, whose results never change",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="inverse.* overrides, e.g. inverse.K=8")


def _read_lax(path: str, frame: int, n4: bool = False):
    import numpy as np

    from medsynth_core.io import read_image

    from .geometry import LaxPlane
    from .infer import percentile_normalise

    img = read_image(path, dtype=np.float64, expect_ndim=(2, 3, 4))
    arr = img.to_dhw()  # (j,i) | (k,j,i) | (t,k,j,i)
    if arr.ndim == 4:
        _check_frame(path, arr, frame)
        arr = arr[frame]
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise UserError(f"{path}: a LAX file must be a single plane (got {arr.shape[0]} slices)")
        arr = arr[0]
    aff = np.eye(4)
    ijk = img.affine
    aff[:3, 0], aff[:3, 1] = ijk[:3, 1], ijk[:3, 0]  # (r, c) = (j, i)
    normal = np.cross(ijk[:3, 1], ijk[:3, 0])
    aff[:3, 2] = normal / np.linalg.norm(normal) * np.linalg.norm(ijk[:3, 0])
    aff[:3, 3] = ijk[:3, 3]
    if n4:
        from .infer import n4_correct

        arr = n4_correct(arr[None])[0]
    # spec §3.3: LAX (after N4, as ex8) clipped at its 99th percentile to [0, 1]
    return LaxPlane(percentile_normalise(arr, 99.0), aff, Path(path).name)


def _read_lax_volume(vol_path: str, mask_path: str, kept: list[int], n_orig: int, hw, K: int, n4: bool):
    """Fork-style LAX data on the dense grid (ex8 L219-230): N4 (when ``n4``) and p99 of the file as written,
    then, for a file on the dense grid of the whole stack (``K(Z-1)+1`` slices, as the official files are when
    slices were dropped), the rows of the kept slices. A file on the kept slices' grid is taken as it is."""
    import numpy as np

    from medsynth_core.io import read_image

    from .infer import n4_correct, percentile_normalise

    g = read_image(vol_path, dtype=np.float64).to_dhw()
    m = read_image(mask_path, dtype=np.float64).to_dhw()
    if n4 and g.ndim == 3:
        g = n4_correct(g)
    g = percentile_normalise(g, 99.0)
    d_kept, d_full = K * (len(kept) - 1) + 1, K * (n_orig - 1) + 1
    out = []
    for name, a in ((vol_path, g), (mask_path, m)):
        if a.shape == (d_kept, *hw):
            out.append(a)
        elif a.shape == (d_full, *hw) and kept == list(range(kept[0], kept[-1] + 1)):
            out.append(a[K * kept[0] : K * kept[-1] + 1])
        else:
            raise UserError(
                f"{name}: shape {a.shape} does not match the dense grid {(d_kept, *hw)} (D = K(n-1)+1 with "
                f"K={K}, n={len(kept)} kept slices) nor that of the whole stack {(d_full, *hw)}"
            )
    return out[0], (out[1] > 0).astype(np.float64)


def _reconstruct(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medsynth_core.atomic import check_output_path
    from medsynth_core.config import config_from_dict, config_to_dict, merge_dicts, parse_overrides
    from medsynth_core.distributed import resolve_device
    from medsynth_core.io import MedicalImage, write_image

    from .config import Config
    from .diffusion import GaussianDiffusion
    from .geometry import dhw_to_ijk_affine
    from .infer import (
        EX10,
        DiffAEPrior,
        kept_slices,
        linear_interp_z,
        load_prior,
        output_affine,
        reconstruct,
        save_panel,
    )

    check_output_path(args.out, what="--out")  # before loading anything (issue 18)
    dev = resolve_device(args.device)
    model, cfg = load_prior(args.checkpoint, dev)
    merged = config_to_dict(cfg)
    if args.heldout is not None:  # ex10's settings, under the user's overrides
        merged = merge_dicts(merged, {"inverse": dict(EX10)})
    merged = merge_dicts(merged, parse_overrides(args.overrides))
    flags = {}
    if args.no_n4:
        flags["n4"] = False
    if args.amp is not None:
        flags["amp"] = args.amp
    cfg = config_from_dict(Config, merge_dicts(merged, {"inverse": flags}), "overrides")
    ic = cfg.inverse
    x, raw, aff = _load_sax(args.sax, args.frame, cfg, n4=ic.n4)
    kept = kept_slices(x, ic.drop_empty)  # spec §2: where the official code drops slices (inverse.drop_empty)
    if len(kept) < 2:
        raise UserError(f"{args.sax}: fewer than two non-empty slices in frame {args.frame}")
    if ic.geometry_from_kept_slices and kept != list(range(kept[0], kept[-1] + 1)):
        raise UserError(
            f"{args.sax}: empty slices inside the stack ({kept}); cannot build a regular dense grid "
            "(inverse.drop_empty=none keeps them)"
        )
    sax_aff = aff.copy()
    sax_aff[:3, 3] = aff[:3, 3] + kept[0] * aff[:3, 0]
    planes = [_read_lax(p, args.frame, ic.n4) for p in args.lax]
    targets = None
    if args.lax_volume or args.lax_mask:
        if not (args.lax_volume and args.lax_mask):
            raise UserError("--lax-volume and --lax-mask must be given together")
        targets = _read_lax_volume(args.lax_volume, args.lax_mask, kept, x.shape[0], x.shape[1:], ic.K, ic.n4)
    if not planes and targets is None:
        raise UserError("give LAX views (--lax ...) or fork-style --lax-volume/--lax-mask")
    d = GaussianDiffusion(cfg.diffusion.T, cfg.diffusion.beta_start, cfg.diffusion.beta_end)
    prior = DiffAEPrior(model, d, ic.encode_steps, ic.decode_steps, ic.checkpoint, ic.flip_h)
    torch.manual_seed(cfg.run.seed)
    out = Path(args.out)
    stem = Path(args.sax).name.split(".")[0]
    if args.heldout is not None:
        return _heldout(
            args,
            prior,
            x[kept],
            sax_aff,
            planes,
            ic,
            out / f"{stem}_frame_{args.frame}_heldout.json",
            targets=targets,
            sax_raw=raw[kept],
        )
    res = reconstruct(prior, x[kept], sax_aff, planes, ic, targets=targets, sax_raw=raw[kept])
    out_aff = dhw_to_ijk_affine(output_affine(aff, kept, x.shape[0], ic.K, ic.geometry_from_kept_slices))
    D = res.volume.shape[0]
    path = out / f"{stem}_frame_{args.frame}_final_{D}slice.nii.gz"
    for vol, name in (
        (res.volume, path.name),
        (res.seeds, f"{stem}_frame_{args.frame}_seeds_{D}slice.nii.gz"),
        (linear_interp_z(x[kept], ic.K), f"{stem}_frame_{args.frame}_z_linear_{D}slice.nii.gz"),
    ):
        write_image(MedicalImage.from_dhw(np.clip(vol, 0, 1).astype(np.float32), out_aff), out / name)
    save_panel(out / f"{stem}_frame_{args.frame}_panel.png", x[kept], planes, res.volume, res.seeds)
    (out / f"{stem}_frame_{args.frame}_history.json").write_text(json.dumps(res.history, indent=1))
    emit(args, {"written": str(path), "iterations": res.iterations, "folder": str(out),
                "also": "the DiffAE seeds, the z-linear baseline, the panel PNG and the loss history, beside it"})  # fmt: skip
    return 0


def _heldout(args, prior, sax, sax_aff, planes, ic, path: Path, targets=None, sax_raw=None) -> int:
    """ex10 protocol (spec §3.10) on real data: LAX planes or a fork LAX volume on the whole stack's dense grid
    (ex10 takes its rows of the held-out gap), and at least 3 kept slices."""
    from .evaluate import heldout_slice_eval

    if sax.shape[0] < 3:
        raise UserError(f"{args.sax}: --heldout needs at least 3 non-empty SAX slices, got {sax.shape[0]}")
    res = heldout_slice_eval(
        prior, sax, sax_aff, planes, ic, seed=args.heldout, targets=targets, sax_raw=sax_raw
    )
    res["settings"] = {
        "seed": args.heldout,
        "K_filled": 2 * ic.K - 1,
        **{
            k: getattr(ic, k) for k in ("lambda_lax", "lambda_smooth", "lambda_lat", "lr", "n4", "iterations")
        },
        "freeze_ends": True,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2))
    emit(args, {**res, "written": str(path)})
    return 0


# ------------------------------------------------------------------------------------------------ evaluate
def _add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", nargs="+", required=True, help="reconstructed dense volume(s) (NIfTI)")
    p.add_argument("--gt", required=True, help="dense ground-truth volume (NIfTI, same grid)")
    p.add_argument("--K", type=int, required=True, help="dense slices per acquired gap (held-out = not k·K)")
    p.add_argument(
        "--pred-labels", nargs="*", default=None, help="segmentations of the predictions (LV1/MYO2/RV3)"
    )
    p.add_argument("--gt-labels", default=None, help="ground-truth segmentation")
    p.add_argument(
        "--lpips-weights",
        default=None,
        help="local torchvision AlexNet weights (alexnet-owt-7be5be79.pth) to add LPIPS; never downloads",
    )
    p.add_argument("--out", required=True, help="output JSON (a CSV is written beside it)")


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from medsynth_core.io import read_image

    from .evaluate import compare_methods, seg_metrics

    gt_img = read_image(args.gt, dtype=np.float64, expect_ndim=3)
    gt = gt_img.to_dhw()
    spacing = gt_img.spacing[::-1]
    preds = {}
    for p in args.pred:
        v = read_image(p, dtype=np.float64, expect_ndim=3).to_dhw()
        if v.shape != gt.shape:
            raise UserError(f"{p}: shape {v.shape} != ground truth {gt.shape} ({args.gt})")
        preds[Path(p).name] = v
    lp = None
    if args.lpips_weights:
        from medsynth_core.metrics import LPIPS

        lp = LPIPS("alex", backbone_weights=args.lpips_weights)
    res = compare_methods(gt, preds, args.K, spacing=spacing, lpips=lp)
    if args.pred_labels and args.gt_labels:
        gl = read_image(args.gt_labels, dtype=np.int64).to_dhw()
        for p, lab in zip(args.pred, args.pred_labels):
            res[Path(p).name].update(seg_metrics(read_image(lab, dtype=np.int64).to_dhw(), gl, spacing))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    keys = sorted({k for r in res.values() for k in r})
    lines = ["case," + ",".join(keys)] + [
        n + "," + ",".join(str(r.get(k, "")) for k in keys) for n, r in res.items()
    ]
    out.with_suffix(".csv").write_text("\n".join(lines) + "\n")
    emit(args, res)
    return 0


# ------------------------------------------------------------------------------------------------ demo / summary
def _add_demo(p: argparse.ArgumentParser) -> None:
    demo_arguments(PROG)(p)
    p.add_argument(
        "--config",
        default=None,
        help="demo recipe (default: the bundled configs/toy.yaml, ~4 min on one CPU)",
    )
    p.add_argument(
        "--prior",
        default=None,
        help="use this trained prior checkpoint instead of training the demo prior (e.g. an earlier demo run's)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. inverse.iterations=30"
    )


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    s = run_demo(args.out, config=args.config, overrides=args.overrides, prior=args.prior)
    emit(args, s)
    return 0


def summarise(cfg) -> dict:
    import torch

    from medsynth_core.training import count_parameters

    from .model import DiffAE

    with torch.device("meta"):
        m = DiffAE(cfg.model)
    s = cfg.model.image_size
    return {
        "DiffAE": count_parameters(m),
        "SemanticEncoder": count_parameters(m.encoder),
        "ConditionalUNet": count_parameters(m.unet),
        "shapes": {
            "encoder_in": [1, cfg.model.in_channels, s, s],
            "z_sem": [1, cfg.model.z_channels],
            "unet_in": [1, cfg.model.in_channels, s, s],
            "t": [1],
            "unet_out": [1, cfg.model.out_channels, s, s],
        },
    }


# ------------------------------------------------------------------------------------------------ convert
def _add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official Lightning .ckpt (model./ema_model. prefixes) or a raw state dict")
    p.add_argument("dst", help="output medsynth checkpoint (.pt)")
    p.add_argument(
        "--constructor",
        default=None,
        help="JSON file with the official BeatGANsAutoencConfig arguments (when the .ckpt lacks them)",
    )
    p.add_argument("--config", default=None, help="or: an mgdcr YAML config whose model section matches")
    p.add_argument(
        "--prefix", default=None, help="state-dict prefix to use (default ema_model. when present)"
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a file that holds pickled objects beyond tensors (e.g. the official Lightning "
        "hyper_parameters) with full pickle (can run code: only for files you trust)",
    )


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_official

    constructor = None
    if args.constructor:
        constructor = json.loads(Path(args.constructor).read_text())
    elif args.config:
        from medsynth_core.config import load_config

        from .config import Config

        constructor = load_config(Config, args.config).model
    res = convert_official(args.src, args.dst, constructor, args.prefix, args.trust_pickle)
    emit(args, {"written": res["dst"], "tensors": res["n_keys"], "unmapped": res["unmapped"]})
    return 0


VERBS = [
    train_verb(
        PROG,
        _load_cfg,
        _run_train,
        help="train the DiffAE prior, or with latent.enabled its latent DDIM "
        "(single process or under torchrun)",
    ),  # fmt: skip
    Verb("encode", "encode SAX slices to (x_T, z_sem)", _encode, _add_encode),
    Verb(
        "reconstruct",
        "reconstruct a dense 3D cardiac volume from sparse SAX slices and LAX views",
        _reconstruct,
        _add_reconstruct,
    ),
    Verb(
        "evaluate",
        "PSNR/SSIM/RMSE on held-out and acquired slices, Dice/HD95; JSON + CSV",
        _evaluate,
        _add_evaluate,
    ),
    Verb(
        "demo",
        "train the demo prior on phantoms (resume once), reconstruct held-out phantoms, score vs z-linear",
        _demo,
        _add_demo,
    ),
    summary_verb(_load_cfg, summarise),
    Verb(
        "convert-official",
        "convert an official DiffAE/cine-SR checkpoint to this package's format",
        _convert,
        _add_convert,
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

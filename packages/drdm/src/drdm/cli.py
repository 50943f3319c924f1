"""Command line: ``drdm VERB`` (train, augment, evaluate, downstream, demo, summary, convert-official)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from medsynth_core.cli import (
    HELP,
    UserError,
    Verb,
    add_config_arguments,
    demo_arguments,
    emit,
    run_cli,
    summary_verb,
    train_verb,
)

PROG = "drdm"
DESCRIPTION = (
    "Deformation-Recovery Diffusion Model: diverse topology-preserving deformations for augmentation"
)


def _load(args: argparse.Namespace):
    from .config import load

    return load(args.config, args.overrides)  # ours, a bundled name, or an official Config/config_*.yaml


def _run_train(cfg, args: argparse.Namespace):
    from .train import train

    return train(cfg, resume=args.resume)


def _net_and_cfg(args: argparse.Namespace):
    net, cfg = _loaded(args)
    from medsynth_core import training as T

    # run.channels_last (issue 19; auto = CUDA only): the network call is 1.56x faster with it on a CPU
    T.to_channels_last(net, T.channels_last_enabled(cfg.run.channels_last, args.device))
    return net, cfg


def _loaded(args: argparse.Namespace):
    from .config import load
    from .infer import load_network

    cfg = load(args.config, args.overrides) if args.config else None
    net, ckpt_cfg = load_network(args.checkpoint, cfg)
    if (
        cfg is not None
    ):  # explicit config/overrides for sampling settings; the network shape comes from the ckpt
        if (cfg.model.ndims, cfg.diffusion.timesteps) != (ckpt_cfg.model.ndims, ckpt_cfg.diffusion.timesteps):
            raise UserError(
                f"--config {args.config} does not match checkpoint {args.checkpoint} (ndims/timesteps)"
            )
        return net, cfg
    if args.overrides:
        from medsynth_core.config import config_from_dict, config_to_dict, merge_dicts, parse_overrides

        from .config import DRDMConfig

        ckpt_cfg = config_from_dict(
            DRDMConfig,
            merge_dicts(config_to_dict(ckpt_cfg), parse_overrides(args.overrides)),
            source=f"{args.checkpoint} config (with overrides)",
        )
    return net, ckpt_cfg


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=False)
    p.add_argument(
        "--checkpoint", required=True, help="our checkpoint (train output or convert-official output)"
    )
    p.add_argument("--device", default="cpu")


def _augment_args(p: argparse.ArgumentParser) -> None:
    _add_sampling_args(p)
    p.add_argument(
        "--images", required=True, help="folder of NIfTI images (2D slices, stacks of slices, volumes)"
    )
    p.add_argument("--labels", default=None, help="optional folder of label maps (same name, or <stem>_gt)")
    p.add_argument("--out", required=True, help="output folder")


def _augment(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import check_output_path

    from .infer import augment_folder

    check_output_path(args.out, what="--out")  # before loading anything (issue 18)

    net, cfg = _net_and_cfg(args)
    res = augment_folder(
        net.to(args.device), cfg, args.images, args.out, labels=args.labels, device=args.device
    )
    emit(args, {"files": res["files"], "written": len(res["written"]), "out": args.out})
    return 0


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=False)
    p.add_argument("--checkpoint", default=None, help="our checkpoint (needed unless only --segmentations)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder for metrics.json and the CSV files")
    p.add_argument("--levels", default="1,10,20,40,60,79", help="noise levels for forward statistics")
    p.add_argument("--seeds", type=int, default=4, help="seeds per level")
    p.add_argument("--image", default=None, help="NIfTI image for recovery statistics (default: a phantom)")
    p.add_argument(
        "--t-start", type=int, default=None, help="T' for recovery (default augment.start_noise_step)"
    )
    p.add_argument(
        "--images",
        default=None,
        help="folder of images: per case and sample, fold ratio and |S phi| (mean/max, %% of S) of phi and "
        "Psi_rand (augment.aug_coe samples each) -> deformation.csv",
    )
    p.add_argument("--labels", default=None, help="label folder: the same figures inside the foreground mask")
    p.add_argument(
        "--segmentations",
        default=None,
        help="folder of predicted label maps scored against --labels: DSC, sensitivity, precision per "
        "structure -> segmentation.csv",
    )
    p.add_argument(
        "--downstream", action="store_true", help="also run the tiny segmentation check on phantoms"
    )


def _evaluate(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medsynth_core.atomic import check_output_path

    check_output_path(args.out, what="--out")  # before the evaluation (issue 18)

    from medsynth_core.io import read_image
    from medsynth_core.phantoms import labelled_anatomy

    from .config import build_diffusion
    from .data import minmax, resize, to_tensor_layout
    from .evaluate import (
        augmentation_rows,
        downstream_check,
        forward_level_stats,
        mean_rows,
        recovery_stats,
        segmentation_rows,
        write_metrics,
    )

    metrics: dict = {}
    csvs: dict = {}
    if args.segmentations:
        if not args.labels:
            raise UserError("--segmentations needs --labels (the ground-truth label maps)")
        rows = segmentation_rows(args.segmentations, args.labels)
        metrics["segmentation"] = {"cases": len(rows), **mean_rows(rows)}
        csvs["segmentation.csv"] = rows
    if args.checkpoint is None:
        if not args.segmentations:
            raise UserError("evaluate needs --checkpoint (or only --segmentations with --labels)")
        write_metrics(args.out, metrics, None, csvs)
        emit(args, metrics)
        return 0
    net, cfg = _net_and_cfg(args)
    net = net.to(args.device)
    s, nd = cfg.diffusion.img_size, cfg.model.ndims
    try:
        levels = [int(v) for v in args.levels.split(",") if v.strip()]
    except ValueError as exc:
        raise UserError(f"--levels must be comma-separated integers, got {args.levels!r}") from exc
    rows = forward_level_stats(build_diffusion(cfg, sampling=True), levels, seeds=range(args.seeds))
    if args.image:
        arr = to_tensor_layout(read_image(args.image).array)
        if arr.ndim == nd + 1:
            arr = arr[..., arr.shape[-1] // 2]
        x = minmax(resize(torch.from_numpy(np.asarray(arr, np.float32))[None], s))[None]
    else:
        x = torch.from_numpy(labelled_anatomy((s,) * nd, seed=3).image)[None, None]
    torch.manual_seed(0)
    t0 = cfg.augment.start_noise_step if args.t_start is None else args.t_start
    metrics.update({"forward_levels": rows, "recovery": recovery_stats(net, cfg, x.to(args.device), t0)})
    if args.images:
        drows = augmentation_rows(net, cfg, args.images, args.labels, args.device)
        metrics["deformation"] = {
            "cases": len({r["case"] for r in drows}),
            "samples": len(drows),
            **mean_rows(drows),
        }
        csvs["deformation.csv"] = drows
    if args.downstream:
        metrics["downstream"] = downstream_check(net, cfg)
    write_metrics(args.out, metrics, rows, csvs)
    emit(args, metrics.get("deformation", metrics["recovery"]))
    return 0


def _int_list(value: str, flag: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise UserError(f"{flag} must be comma-separated integers, got {value!r}") from exc
    if not out:
        raise UserError(f"{flag} is empty")
    return out


def _downstream_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, required=False)
    p.add_argument("--checkpoint", default=None, help="DRDM checkpoint for the drdm arm (ours or converted)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output folder: downstream.json, cases.csv, figure.png")
    p.add_argument(
        "--images", default=None, help="training image folder (default: phantoms of the demo family)"
    )
    p.add_argument("--labels", default=None, help="training label folder (<stem> or <stem>_gt)")
    p.add_argument("--test-images", default=None, help="held-out image folder (needed with --images)")
    p.add_argument("--test-labels", default=None, help="held-out label folder")
    p.add_argument("--k", default="2,5", help="labelled subjects per run (comma-separated)")
    p.add_argument("--seeds", default="0,1,2", help="runs per arm and k (comma-separated seeds)")
    p.add_argument("--arms", default="no_aug,bigaug,drdm", help="arms: no_aug, bigaug, drdm")
    p.add_argument("--steps", type=int, default=None, help="U-Net Adam steps per run (default 300)")
    p.add_argument("--copies", type=int, default=None, help="DRDM samples per training image (default 8)")
    p.add_argument("--n-test", type=int, default=None, help="held-out phantoms (phantom data only)")


def _downstream(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import check_output_path

    from .downstream import ARMS, folder_data, run_downstream, settings_from

    check_output_path(args.out, what="--out")
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        raise UserError(f"--arms: unknown arm(s) {bad or args.arms!r}; choose from {', '.join(ARMS)}")
    st = settings_from(
        ks=_int_list(args.k, "--k"),
        seeds=_int_list(args.seeds, "--seeds"),
        arms=arms,
        steps=args.steps,
        copies=args.copies,
        n_test=args.n_test,
    )
    if args.checkpoint is not None:
        net, cfg = _net_and_cfg(args)
        net = net.to(args.device)
    elif "drdm" in arms:
        raise UserError("the drdm arm needs --checkpoint (or leave it out: --arms no_aug,bigaug)")
    else:
        from .config import load

        net, cfg = None, load(args.config or "demo", args.overrides)
    train_pool = test = None
    if args.images or args.test_images:
        if not (args.images and args.labels and args.test_images and args.test_labels):
            raise UserError("folder data needs --images, --labels, --test-images and --test-labels")
        s, nd = cfg.diffusion.img_size, cfg.model.ndims
        try:
            train_pool = folder_data(args.images, args.labels, s, nd)
            test = folder_data(args.test_images, args.test_labels, s, nd)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        n_sub = len(set(train_pool.groups))
        if max(st.ks) > n_sub:
            raise UserError(f"--k {args.k}: --images {args.images} holds only {n_sub} subject(s)")
    res = run_downstream(net, cfg, args.out, st, train_pool, test)
    brief = {
        arm: {k: round(v["dsc_mean"]["mean"], 4) for k, v in per_k.items()}
        for arm, per_k in res["summary"].items()
    }
    emit(args, {"dsc_mean": brief, "out": args.out, "seconds": round(res["seconds"], 1)})
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    m = run_demo(args.out)
    rec = m["heldout"]["recovery"]
    emit(
        args,
        {
            "figure": str(Path(args.out) / "figure.png"),
            "seconds": m["seconds"],
            "recovery": {
                k: {n: round(v[n], 3) for n in ("cosine", "epe_ratio")} for k, v in rec["fields"].items()
            },
            "augment": {k: m["augment"][k] for k in ("phi", "psi_rand", "psi_rand_matched")},
            "downstream": m.get("downstream"),
        },
    )
    return 0


def summarise(cfg) -> dict:
    from medsynth_core.training import count_parameters

    from .config import build_network

    net = build_network(cfg)
    s, nd = cfg.diffusion.img_size, cfg.model.ndims
    out = {
        "recresacnet": {
            **count_parameters(net),
            "tensors": len(net.state_dict()),
            "input": {"x": [1, cfg.model.num_input_chn] + [s] * nd, "t": [1]},
            "output": {"ddf": [1, nd] + [s] * nd, "units": "fraction of the image side S"},
        },
        "forward_diffusion": {
            "control_grid": [cfg.diffusion.ctl_sz] * nd,
            "timesteps": cfg.diffusion.timesteps,
            "outputs": {"I_t": [1, 1] + [s] * nd, "U_lab": [1, nd] + [s] * nd, "U_img": [1, nd] + [s] * nd},
        },
    }
    return out


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official .pth (state_dict of RecResACNet)")
    p.add_argument("dst", help="output medsynth checkpoint (.pt)")
    p.add_argument("--config", default=None, help="official Config/config_*.yaml (or ours) of that model")


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_official

    rep = convert_official(args.src, args.dst, args.config)
    emit(args, rep)
    if rep["unmapped"]:
        print(
            f"warning: {len(rep['unmapped'])} key(s) of {args.src} were not used: {rep['unmapped']}",
            file=sys.stderr,
        )
    return 0


VERBS = [
    train_verb(PROG, _load, _run_train),
    Verb(
        "augment",
        "write deformed images, labels and deformation fields for a folder of NIfTI images",
        _augment,
        _augment_args,
    ),
    Verb("evaluate", HELP["evaluate"], _evaluate, _evaluate_args),
    Verb(
        "downstream",
        "paper Table 2 in small: U-Net on k labelled subjects without / BigAug / DRDM augmentation",
        _downstream,
        _downstream_args,
    ),
    Verb(
        "demo",
        HELP["demo"],
        _demo,
        demo_arguments(PROG),
    ),
    summary_verb(_load, summarise),
    Verb("convert-official", HELP["convert-official"], _convert, _convert_args),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

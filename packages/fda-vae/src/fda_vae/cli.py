"""Command line: ``fda-vae VERB`` (train, synthesize, prepare, evaluate, demo, summary, convert-official)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsynth_core.cli import (
    HELP,
    UserError,
    Verb,
    config_loader,
    demo_arguments,
    emit,
    run_cli,
    summary_verb,
    train_verb,
)

PROG = "fda-vae"
ISSUE = "#3"
DESCRIPTION = "Flip Distribution Alignment VAE: multi-phase contrast MRI synthesis"
PACKAGE_DIR = Path(__file__).resolve().parents[2]


def _load_cfg(path: str | None, overrides: Sequence[str] = ()):
    from medsynth_core.config import config_file, load_config

    from .config import Config

    return load_config(Config, config_file(path, __file__), list(overrides))


AMP_CHOICES = ("off", "bf16", "fp16")
AMP_HELP = (
    "mixed precision on CUDA (fp16 uses a GradScaler); ignored (off) on CPU, so CPU results never change"
)


def _add_amp(p: argparse.ArgumentParser, default: str | None, extra: str = "") -> None:
    p.add_argument("--amp", choices=AMP_CHOICES, default=default, help=AMP_HELP + extra)


# ------------------------------------------------------------------------------------------- train
def amp_override(args: argparse.Namespace) -> list[str]:
    """``--amp`` of ``train`` as the config key ``run.amp`` (after the ``key=value`` arguments)."""
    return [f"run.amp={args.amp}"] if getattr(args, "amp", None) else []


def _run_train(cfg, args: argparse.Namespace):
    from .train import train

    return train(cfg, resume=args.resume)


# -------------------------------------------------------------------------------------- synthesize
def add_synthesize(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="generator checkpoint (train or convert-official)")
    p.add_argument("--input", required=True, help="NIfTI slice/volume, or a folder of them")
    p.add_argument("--output", required=True, help="output file (single input) or folder")
    p.add_argument(
        "--direction",
        choices=["a2b", "b2a"],
        default="a2b",
        help="a2b: phase_a (e.g. venous) -> phase_b (e.g. delay); b2a: the reverse",
    )
    p.add_argument("--sample", action="store_true", help="decode -mu + sigma*eps instead of -mu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument(
        "--output-range",
        choices=["model", "unit"],
        default="model",
        help="intensities of the written image: model = [-1,1], unit = [0,1]",
    )
    p.add_argument("--device", default="cpu")
    _add_amp(p, "off")


def cmd_synthesize(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import check_output_path
    from medsynth_core.io import MedicalIOError, list_images

    from .amp import autocast, resolve_amp
    from .infer import load_generator, synthesize_file

    amp = resolve_amp(args.amp, args.device, "--amp")
    if not Path(args.input).exists():
        raise UserError(f"{args.input}: --input does not exist; pass a NIfTI file or a folder of them")
    # before any work: a folder input writes a folder, a file input one file (issue 18)
    check_output_path(args.output, folder=Path(args.input).is_dir(), what="--output")
    model, cfg = load_generator(args.checkpoint, args.device)
    src = Path(args.input)
    if src.is_dir():
        try:
            files = list_images(src, ("*.nii.gz", "*.nii"))
        except MedicalIOError as exc:
            raise UserError(str(exc)) from exc
        targets = [(f, Path(args.output) / f.name) for f in files]
    else:
        targets = [(src, Path(args.output))]
    with autocast(amp, args.device):
        done = [
            synthesize_file(
                model,
                cfg,
                a,
                b,
                src=args.direction[0],
                sample=args.sample,
                seed=args.seed,
                batch_size=args.batch_size,
                device=args.device,
                output_range=args.output_range,
            )
            for a, b in targets
        ]
    emit(args, done)
    return 0


# ----------------------------------------------------------------------------------------- prepare
def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "raw", help="LLD-MMRI root with images/<patient>/<study>/<series>.nii.gz and labels/Annotation.json"
    )
    p.add_argument("out", help="output root: out/<phase>/<patient>_<slice>.nii.gz")
    p.add_argument(
        "--phases", nargs="+", default=["c_v", "delay"], help="phases to extract (names or C+V style)"
    )
    p.add_argument(
        "--target", default=None, help="phase whose grid the others are resampled onto (default: last)"
    )
    p.add_argument(
        "--min-fraction",
        type=float,
        default=0.0,
        help="keep slices whose non-zero fraction exceeds this in every phase",
    )
    p.add_argument(
        "--no-register",
        dest="register",
        action="store_false",
        help="skip the rigid registration (SimpleITK Euler 3D, mutual information) of each phase onto "
        "the target phase; only resample onto the target grid in scanner coordinates",
    )
    p.add_argument(
        "--register-iterations",
        type=int,
        default=50,
        help="optimiser iterations per resolution level of the registration (default 50)",
    )


def cmd_prepare(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import check_output_path

    from .data import prepare_lld_mmri

    check_output_path(args.out, what="output root")

    emit(
        args,
        prepare_lld_mmri(
            args.raw,
            args.out,
            args.phases,
            args.target,
            args.min_fraction,
            register=args.register,
            register_iterations=args.register_iterations,
        ),
    )
    return 0


# ---------------------------------------------------------------------------------------- evaluate
def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+",
        help="one generator checkpoint per phase pair (each covers its two directions; three pairs = six tasks)",
    )
    p.add_argument("--out", required=True, help="folder for metrics.json and per_slice.csv")
    p.add_argument(
        "--split", choices=["val", "train", "test"], default="val", help="test needs data.test_ratio > 0"
    )
    p.add_argument(
        "--modes", nargs="+", choices=["deterministic", "sampled"], default=["deterministic", "sampled"]
    )
    p.add_argument("--directions", nargs="+", choices=["a2b", "b2a"], default=["a2b", "b2a"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    _add_amp(p, "off")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides of the checkpoint's config, e.g. data.root=/x eval.lpips_weights=/w.pth",
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import atomic_write_text, check_output_path
    from medsynth_core.config import config_from_dict, config_to_dict, merge_dicts, parse_overrides

    from .amp import autocast, resolve_amp
    from .config import Config
    from .data import build_split_dataset
    from .evaluate import build_lpips, evaluate_model, rows_to_csv
    from .infer import load_generator

    amp = resolve_amp(args.amp, args.device, "--amp")
    check_output_path(args.out, what="--out")  # before the evaluation, not after it (issue 18)
    results, all_rows, tasks = [], [], {}
    for ckpt in args.checkpoint:
        model, cfg = load_generator(ckpt, args.device)
        if args.overrides:
            cfg = config_from_dict(
                Config,
                merge_dicts(config_to_dict(cfg), parse_overrides(args.overrides)),
                f"{ckpt} config (with overrides)",
            )
        ds = build_split_dataset(cfg, args.split)
        lp = build_lpips(cfg.eval.lpips_weights, args.device)
        with autocast(amp, args.device):
            summary, rows = evaluate_model(
                model,
                ds,
                args.directions,
                args.modes,
                cfg.eval.batch_size,
                args.seed,
                lp,
                cfg.eval.per_volume,
                args.device,
            )
        summary["amp"] = amp
        names = {"a": cfg.data.phase_a, "b": cfg.data.phase_b}
        if cfg.data.source == "phantom":
            names = dict(zip("ab", cfg.data.phantom_phases, strict=True))
        for d in args.directions:
            tasks[f"{names[d[0]]}->{names[d[2]]}"] = summary[d]
        for r in rows:
            r.update(checkpoint=str(ckpt), task=f"{names[r['direction'][0]]}->{names[r['direction'][2]]}")
        summary.update(checkpoint=str(ckpt), phases=names, lpips=lp is not None)
        results.append(summary)
        all_rows.extend(rows)
    report = dict(results[0]) if len(results) == 1 else {"models": results}
    report["tasks"] = tasks
    out = Path(args.out)
    atomic_write_text(out / "metrics.json", json.dumps(report, indent=2))
    atomic_write_text(out / "per_slice.csv", rows_to_csv(all_rows))
    emit(args, report)
    return 0


# ----------------------------------------------------------------------------------------- summary
def summarize(cfg) -> dict[str, Any]:
    from medsynth_core.training import count_parameters

    from .losses import PerceptualLoss
    from .model import build_discriminators, build_generator

    g = build_generator(cfg.model)
    d = build_discriminators(cfg.model, cfg.disc)
    s, c, lat = cfg.data.image_size, cfg.model.in_channels, cfg.model.latent_channels
    down = g.downsample
    one_way = sum(
        count_parameters(m)["total"]
        for m in (g.encoder, g.quant_conv_mu, g.quant_conv_log_sigma, g.post_quant_conv_b, g.decoder_b)
    )
    out = {
        "generator": count_parameters(g),
        "encoder": count_parameters(g.encoder),
        "decoder_a": count_parameters(g.decoder_a),
        "decoder_b": count_parameters(g.decoder_b),
        "latent_1x1_convs": sum(
            count_parameters(m)["total"]
            for m in (g.quant_conv_mu, g.quant_conv_log_sigma, g.post_quant_conv_a, g.post_quant_conv_b)
        ),
        "inference_path_one_direction": one_way,
        "disc_a": count_parameters(d["a"]),
        "disc_b": count_parameters(d["b"]),
        "shapes": {
            "input": [1, c, s, s],
            "mu": [1, lat, s // down, s // down],
            "sigma": [1, lat, s // down, s // down],
            "output": [1, cfg.model.out_channels, s, s],
        },
    }
    if cfg.loss.w_perc > 0 and cfg.loss.perceptual == "resnet50-random":
        out["perceptual_resnet50_frozen"] = count_parameters(PerceptualLoss("resnet50-random"))
    return out


# -------------------------------------------------------------------------------- convert-official
def add_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official generator_*.pth / best_generator.pth / discriminator_*.pth")
    p.add_argument("dst", help="output medsynth checkpoint (.pt)")
    p.add_argument(
        "--config", default=None, help="our YAML config to store with it (default: paper settings)"
    )
    p.add_argument(
        "--constructor",
        default=None,
        help="JSON file (or string) with the official constructor keyword arguments",
    )
    p.add_argument(
        "--norm-num-groups",
        type=int,
        default=None,
        help="the official norm_num_groups (GroupNorm group count; the paper uses 32). The weights do "
        "not hold it: without --constructor it must be given unless the file stores it",
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_official

    constructor = None
    if args.constructor:
        text = Path(args.constructor).read_text() if Path(args.constructor).is_file() else args.constructor
        try:
            constructor = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"--constructor: not valid JSON ({exc})") from exc
    cfg = _load_cfg(args.config) if args.config else None
    if args.norm_num_groups is not None and args.norm_num_groups < 1:
        raise UserError(f"--norm-num-groups must be >= 1, got {args.norm_num_groups}")
    report = convert_official(args.src, args.dst, cfg, constructor, args.norm_num_groups)
    emit(args, report)
    if report["dropped_keys"]:
        print(
            f"dropped {len(report['dropped_keys'])} key(s) that the official forward never uses (proj_attn)",
            file=sys.stderr,
        )
    return 0


# -------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    t0 = time.perf_counter()
    result = run_demo(args.out)
    result["seconds"] = time.perf_counter() - t0
    emit(args, result)
    return 0


VERBS = [
    train_verb(
        PROG,
        config_loader("fda_vae.config:Config", __file__, amp_override),
        _run_train,
        add_arguments=lambda p: _add_amp(p, None, " (default: the config's run.amp, off)"),
    ),  # fmt: skip
    Verb(
        "synthesize",
        "translate 2D slices or whole 3D NIfTI volumes from one phase to the other",
        cmd_synthesize,
        add_synthesize,
    ),
    Verb(
        "prepare",
        "extract co-registered 2D slice pairs from raw LLD-MMRI volumes (each phase rigidly registered "
        "onto the target phase; --no-register to skip)",
        cmd_prepare,
        add_prepare,
    ),
    Verb("evaluate", HELP["evaluate"], cmd_evaluate, add_evaluate),
    Verb(
        "demo",
        HELP["demo"],
        cmd_demo,
        demo_arguments(PROG),
    ),
    summary_verb(config_loader("fda_vae.config:Config", __file__), summarize),
    Verb(
        "convert-official",
        HELP["convert-official"],
        cmd_convert,
        add_convert,
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

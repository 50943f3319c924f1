"""Command line: ``uni-coal VERB`` (train, synthesize, prepare, evaluate, demo, summary, convert-official,
convert-config)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from medsynth_core.cli import (
    HELP,
    UserError,
    Verb,
    demo_arguments,
    emit,
    run_cli,
    summary_verb,
    train_verb,
)

PROG = "uni-coal"
ISSUE = "#6"
DESCRIPTION = "Uni-COAL: co-modulated alias-free GAN for MR cross-modality synthesis and super-resolution"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _load(args: argparse.Namespace):
    from medsynth_core.config import ConfigError, config_file, load_config

    from .config import Config

    try:
        return load_config(Config, config_file(args.config, __file__), args.overrides)
    except ConfigError as exc:
        raise UserError(str(exc)) from exc


def _run_train(cfg, args: argparse.Namespace):
    from .train import train

    return train(cfg, resume=args.resume)


def _train_report(res) -> dict:
    return {k: res[k] for k in ("run", "steps", "step", "last")}


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="our checkpoint (or one made by convert-official)")
    p.add_argument(
        "--input", required=True, help="source NIfTI volume (co-registered; slices along axis 0 after LPS)"
    )
    p.add_argument("--output", required=True, help="output NIfTI path (a PNG preview is written beside it)")
    p.add_argument("--target", required=True, help="target modality name, e.g. T2 (see data.modalities)")
    p.add_argument(
        "--thickness",
        type=float,
        default=1.0,
        help="source slice spacing in output-slice units (1 = CMS, 4 = 4x SR/CMSR)",
    )
    p.add_argument("--out-step", type=float, default=1.0, help="output slice spacing in the same units")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")


def _synthesize(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import check_output_path

    from .infer import synthesize_nifti

    if args.thickness <= 0 or args.out_step <= 0:
        raise UserError("--thickness and --out-step must be > 0")
    check_output_path(args.output, folder=False, what="--output")  # before loading anything (issue 18)
    emit(
        args,
        synthesize_nifti(
            args.checkpoint,
            args.input,
            args.output,
            args.target,
            args.thickness,
            args.out_step,
            args.seed,
            args.batch_size,
            args.device,
        ),
    )
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="raw NIfTI folder: ixi <subject>-T1/-T2/-PD.nii.gz (any depth), brats19 <subject>/<subject>_t1/_t2/"
        "_flair/_seg.nii.gz, adni <subject>-T1/-FLAIR.nii.gz",
    )
    p.add_argument("--output", required=True, help="folder for <subject>.h5 and the train.txt/test.txt lists")
    p.add_argument(
        "--layout", choices=["ixi", "brats19", "adni"], default="ixi", help="dataset layout (h5 keys)"
    )
    p.add_argument(
        "--modalities", nargs="+", default=None, help="subset of the layout's modalities (default: all)"
    )
    p.add_argument(
        "--registration",
        choices=["rigid", "resample", "none"],
        default=None,
        help="non-reference volumes onto the reference grid (default: rigid for ixi/adni, none for brats19)",
    )
    p.add_argument(
        "--sr-thickness", type=int, default=None, help="also write <ref>_hr4sr/<ref>_lr4sr (ADNI SR: 5)"
    )
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of subjects in test.txt")
    p.add_argument("--seed", type=int, default=0, help="split and registration sampling seed")
    p.add_argument("--skip-incomplete", action="store_true", help="skip subjects lacking a modality file")


def _prepare(args: argparse.Namespace) -> int:
    from .prepare import prepare

    res = prepare(
        args.input,
        args.output,
        args.layout,
        args.modalities,
        args.registration,
        args.sr_thickness,
        args.test_fraction,
        args.seed,
        args.skip_incomplete,
    )
    emit(args, res)
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for metrics.json and metrics.csv")
    p.add_argument("--pred", help="mode 1: folder of predictions written by `synthesize`")
    p.add_argument(
        "--target",
        help="mode 1: folder of target NIfTIs with the same file names; mode 2: target modality name",
    )
    p.add_argument("--checkpoint", help="mode 2: predict the config's test split with this checkpoint")
    p.add_argument("--source", help="mode 2: source modality name")
    p.add_argument("--thickness", type=int, default=1, help="mode 2: source decimation factor (1 = CMS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="mode 2: config overrides (data.root=...)"
    )
    p.add_argument(
        "--fixed-range",
        action="store_true",
        help="Q12 variant: no per-volume percentile renormalisation of the prediction",
    )


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, evaluate_folders

    if args.checkpoint:
        if not args.source or not args.target:
            raise UserError("with --checkpoint give --source and --target modality names")
        res = evaluate_checkpoint(
            args.checkpoint,
            args.source,
            args.target,
            args.thickness,
            args.out,
            args.overrides,
            args.seed,
            paper_norm=not args.fixed_range,
        )
    elif args.pred and args.target:
        res = evaluate_folders(args.pred, args.target, args.out, paper_norm=not args.fixed_range)
    else:
        raise UserError("give --pred and --target folders, or --checkpoint with --source/--target")
    emit(args, {"mean": res["mean"], "std": res["std"], "n": res["n"]})
    return 0


def _summarise(cfg) -> dict:
    from .summary import summary

    return summary(cfg)


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official checkpoint / state dict")
    p.add_argument("dst", help="output checkpoint in this package's format")
    p.add_argument("--config", default=None, help="our config matching the official model (default: paper)")
    p.add_argument(
        "--official-config",
        default=None,
        help="the official YAML the model was trained with (its _BASE_ chain beside it)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a file that holds pickled objects beyond tensors with full pickle (can run code: only "
        "for files you trust)",
    )


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_official

    emit(args, convert_official(args.src, args.dst, args.config, args.official_config, args.trust_pickle))
    return 0


def _convert_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src", help="official YAML (e.g. configs/brats19/T1-T2/UniCOAL/final.yml; _BASE_ chain beside it)"
    )
    p.add_argument("dst", help="our config YAML to write")


def _convert_config(args: argparse.Namespace) -> int:
    from .convert import convert_official_config

    emit(args, convert_official_config(args.src, args.dst))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    res = run_demo(args.out)
    emit(args, {k: v for k, v in res.items() if k != "figure"})
    return 0


VERBS = [
    train_verb(PROG, _load, _run_train, report=_train_report),
    Verb(
        "synthesize",
        "synthesize a target modality / thin slices from a NIfTI volume",
        _synthesize,
        _synth_args,
    ),
    Verb("prepare", "convert NIfTI volumes to the h5 training layout", _prepare, _prepare_args),
    Verb("evaluate", HELP["evaluate"], _evaluate, _eval_args),
    Verb(
        "demo",
        HELP["demo"],
        _demo,
        demo_arguments(PROG),
    ),
    summary_verb(_load, _summarise),
    Verb("convert-official", HELP["convert-official"], _convert, _convert_args),
    Verb(
        "convert-config",
        "convert an official UniCOAL YAML config to this package's config",
        _convert_config,
        _convert_config_args,
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

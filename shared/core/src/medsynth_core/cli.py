"""The command-line frame every package shares: ``<package> VERB [options]``.

A package lists its verbs (name, help, how to add its arguments, what to run) and calls
:func:`run_cli`. Errors meant for the user (bad config key, unreadable file, foreign checkpoint)
print one clear line and exit with status 2 instead of a traceback.

Output (issue 17): a verb prints its result with :func:`emit`, as human ``key: value`` lines, or as one JSON
document when the user passes ``--json`` (every verb accepts it); :func:`say` prints a human-only line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import ConfigError
from .errors import CheckpointError, OutputPathError

EXIT_USER_ERROR = 2
EXIT_NOT_IMPLEMENTED = 3
EXIT_PREEMPTED = 143  # 128 + SIGTERM: training stopped by a signal after saving; `set -e` scripts stop


def preempted_exit(prog: str, result: dict) -> int:
    """Exit code of a ``train`` verb: ``EXIT_PREEMPTED`` with one line on stderr when the loop stopped on a
    signal (``result["preempted"]`` names it) after checkpointing, else 0."""
    if not result.get("preempted"):
        return 0
    print(
        f"{prog} train: stopped by {result['preempted']} after step {result.get('step')}; the checkpoint of "
        "that step is saved: run the same command again to resume",
        file=sys.stderr,
    )
    return EXIT_PREEMPTED


class UserError(RuntimeError):
    """Anything the user can fix (bad input, missing weights); printed without a traceback."""


@dataclass(frozen=True)
class Verb:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None


# the help texts of the verbs every package offers (PACKAGE_CONTRACT), the same words in every package
HELP = {
    "train": "train the model (single process or under torchrun)",
    "evaluate": "compute the paper's metrics and write JSON/CSV",
    "demo": "train the demo recipe on phantoms (resuming once) and score it on held-out phantoms against "
    "the named baselines",
    "summary": "print parameter counts and shapes of every network in a config",
    "convert-official": "convert an official checkpoint to this package's format",
}


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--config C`` plus trailing ``key.sub=value`` overrides."""
    parser.add_argument(
        "--config",
        required=required,
        help="YAML config: a path, or the name of a bundled one (demo, paper; see the package's configs/)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. train.lr=2e-4 data.root=/data/x",
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--resume", default=None, help="checkpoint to resume from (default: the latest in the run directory)"
    )


def train_verb(
    prog: str,
    load: Callable[[argparse.Namespace], Any],
    train: Callable[[Any, argparse.Namespace], Mapping[str, Any]],
    *,
    name: str = "train",
    help: str = HELP["train"],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    report: Callable[[Mapping[str, Any]], Any] | None = None,
) -> Verb:
    """The ``train`` verb of every package: ``--config`` + overrides + ``--resume`` (+ the package's extra
    options), ``train(load(args), args)`` (it reads ``args.resume`` and its own options), the result through
    :func:`emit` (``report`` picks what to print), and exit 143 with one line when SIGTERM stopped the run
    after checkpointing."""

    def run(args: argparse.Namespace) -> int:
        result = train(load(args), args)
        emit(args, dict(result) if report is None else report(result))
        return preempted_exit(prog, dict(result))

    def add(parser: argparse.ArgumentParser) -> None:
        add_train_arguments(parser)
        if add_arguments is not None:
            add_arguments(parser)

    return Verb(name, help, run, add)


def summary_verb(
    load: Callable[[argparse.Namespace], Any], summarise: Callable[[Any], Mapping[str, Any]]
) -> Verb:
    """The ``summary`` verb of every package: ``--config`` + overrides, ``summarise(cfg)`` through :func:`emit`."""

    def run(args: argparse.Namespace) -> int:
        emit(args, summarise(load(args)))
        return 0

    return Verb("summary", HELP["summary"], run, add_config_arguments)


def config_loader(
    config_class: str, package_file: str, extra: Callable[[argparse.Namespace], list[str]] | None = None
):
    """``load(args)`` of a package: its config class (``"module:Class"``, imported when called so ``--help``
    stays torch-free) from ``--config`` (a path or a bundled name next to ``package_file``) with the trailing
    overrides, then ``extra(args)`` (e.g. ``--amp`` as a config key)."""

    def load(args: argparse.Namespace):
        import importlib

        from .config import config_file, load_config

        module, name = config_class.split(":")
        cls = getattr(importlib.import_module(module), name)
        overrides = [*args.overrides, *(extra(args) if extra else [])]
        return load_config(cls, config_file(args.config, package_file), overrides)

    return load


def demo_arguments(prog: str) -> Callable[[argparse.ArgumentParser], None]:
    """``--out`` (default ``runs/demo/<prog>``) for the ``demo`` verb."""

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--out",
            default=f"runs/demo/{prog}",
            help=f"output folder for figure.png and metrics.json (default runs/demo/{prog})",
        )

    return add


def _scalar(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}" if math.isfinite(v) else str(v)
    if v is None:
        return "-"
    return str(v)


def human_lines(obj: Any, prefix: str = "") -> Iterator[str]:
    """``key: value`` lines of a (nested) result: nested keys dotted, lists of scalars on one line, floats with
    6 significant digits."""
    if isinstance(obj, Mapping):
        if not obj and prefix:
            yield f"{prefix}: -"
        for k, v in obj.items():
            yield from human_lines(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        for i, v in enumerate(obj):
            yield from human_lines(v, f"{prefix}[{i}]")
    elif isinstance(obj, (list, tuple)):
        yield (
            f"{prefix}: [{', '.join(_scalar(v) for v in obj)}]"
            if prefix
            else ", ".join(_scalar(v) for v in obj)
        )
    else:
        yield f"{prefix}: {_scalar(obj)}" if prefix else _scalar(obj)


def emit(args: argparse.Namespace, result: Any) -> None:
    """Print a verb's result on stdout: human lines, or one JSON document with ``--json``. Only the main
    process prints (a verb run under torchrun reports once)."""
    from .distributed import is_main_process

    if not is_main_process():
        return
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        for line in human_lines(result):
            print(line)


def say(args: argparse.Namespace, text: str) -> None:
    """A human-only line (``written: ...``); silent with ``--json`` so stdout stays one JSON document."""
    if not getattr(args, "json", False):
        print(text)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .io import MedicalIOError

    # OS errors on paths the user chose (an output that is a file, no permission) are one line too
    return (
        ConfigError,
        CheckpointError,
        UserError,
        MedicalIOError,
        OutputPathError,
        FileNotFoundError,
        PermissionError,
        NotADirectoryError,
        IsADirectoryError,
        FileExistsError,
    )


def build_parser(prog: str, description: str, verbs: Sequence[Verb]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb in verbs:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.help)
        p.add_argument(
            "--json",
            action="store_true",
            help="print the result as one JSON document (default: human key: value lines)",
        )
        if verb.add_arguments is not None:
            verb.add_arguments(p)
        p.set_defaults(_run=verb.run)
    return parser


def run_cli(prog: str, description: str, verbs: Sequence[Verb], argv: Sequence[str] | None = None) -> int:
    args = build_parser(prog, description, verbs).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except _user_errors() as exc:
        # one line whatever the message holds (YAML marks, torch advice run over several lines)
        print(f"{prog} {args.verb}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog} {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, as other command-line tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def not_implemented(prog: str, issue: str) -> Callable[[argparse.Namespace], int]:
    """Handler for verbs whose implementation has not landed yet: says so, exits non-zero."""

    def run(args: argparse.Namespace) -> int:
        print(
            f"{prog} {args.verb}: not implemented yet (tracked in issue {issue}); no output was written",
            file=sys.stderr,
        )
        return EXIT_NOT_IMPLEMENTED

    return run

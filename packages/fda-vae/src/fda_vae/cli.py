"""Command line: ``fda-vae VERB``. The verbs are filled in by the package's issue (#3)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from medsynth_core.cli import Verb, demo_arguments, not_implemented, run_cli

PROG = "fda-vae"
ISSUE = "#3"
DESCRIPTION = "Flip Distribution Alignment VAE: multi-phase contrast MRI synthesis"

VERBS = [
    Verb("train", "train the model (single process or under torchrun)", not_implemented(PROG, ISSUE)),
    Verb("synthesize", "translate 2D slices or whole 3D NIfTI volumes from one phase to the other", not_implemented(PROG, ISSUE)),
    Verb("prepare", "extract co-registered 2D slice pairs from raw LLD-MMRI volumes", not_implemented(PROG, ISSUE)),
    Verb("evaluate", "compute the paper's metrics and write JSON/CSV", not_implemented(PROG, ISSUE)),
    Verb("demo", "train briefly on the embedded phantom, resume once, infer, evaluate", not_implemented(PROG, ISSUE), demo_arguments(PROG)),
    Verb("summary", "print parameter counts and shapes of every network in a config", not_implemented(PROG, ISSUE)),
    Verb("convert-official", "convert an official checkpoint to this package's format", not_implemented(PROG, ISSUE)),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

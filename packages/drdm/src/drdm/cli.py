"""Command line: ``drdm VERB``. The verbs are filled in by the package's issue (#4)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from medsynth_core.cli import Verb, demo_arguments, not_implemented, run_cli

PROG = "drdm"
ISSUE = "#4"
DESCRIPTION = "Deformation-Recovery Diffusion Model: diverse topology-preserving deformations for augmentation"

VERBS = [
    Verb("train", "train the model (single process or under torchrun)", not_implemented(PROG, ISSUE)),
    Verb("augment", "write deformed images, labels and deformation fields for a folder of NIfTI images", not_implemented(PROG, ISSUE)),
    Verb("evaluate", "compute the paper's metrics and write JSON/CSV", not_implemented(PROG, ISSUE)),
    Verb("demo", "train briefly on the embedded phantom, resume once, infer, evaluate", not_implemented(PROG, ISSUE), demo_arguments(PROG)),
    Verb("summary", "print parameter counts and shapes of every network in a config", not_implemented(PROG, ISSUE)),
    Verb("convert-official", "convert an official checkpoint to this package's format", not_implemented(PROG, ISSUE)),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

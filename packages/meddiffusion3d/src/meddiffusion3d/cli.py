"""Command line: ``meddiffusion3d VERB``. The verbs are filled in by the package's issue (#7 and #8)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from medsynth_core.cli import Verb, demo_arguments, not_implemented, run_cli

PROG = "meddiffusion3d"
ISSUE = "#7 and #8"
DESCRIPTION = "3D MedDiffusion: patch-volume VQ autoencoder, BiFlowNet latent diffusion and ControlNet"

VERBS = [
    Verb("train", "train the model (single process or under torchrun)", not_implemented(PROG, ISSUE)),
    Verb("train-ae", "train the patch-volume autoencoder (--stage 1|2)", not_implemented(PROG, ISSUE)),
    Verb("encode", "encode volumes to latent files", not_implemented(PROG, ISSUE)),
    Verb("decode", "decode latent files to volumes", not_implemented(PROG, ISSUE)),
    Verb("train-controlnet", "train a ControlNet for a degraded-input task", not_implemented(PROG, ISSUE)),
    Verb("generate", "sample new volumes of a class and shape", not_implemented(PROG, ISSUE)),
    Verb("restore", "restore a degraded volume with a trained ControlNet", not_implemented(PROG, ISSUE)),
    Verb("evaluate", "compute the paper's metrics and write JSON/CSV", not_implemented(PROG, ISSUE)),
    Verb("demo", "train briefly on the embedded phantom, resume once, infer, evaluate", not_implemented(PROG, ISSUE), demo_arguments(PROG)),
    Verb("summary", "print parameter counts and shapes of every network in a config", not_implemented(PROG, ISSUE)),
    Verb("convert-official", "convert an official checkpoint to this package's format", not_implemented(PROG, ISSUE)),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

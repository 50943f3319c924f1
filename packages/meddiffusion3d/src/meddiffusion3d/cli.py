"""Command line: ``meddiffusion3d VERB``.

Part 1 (issue #7, the autoencoder): ``train-ae``, ``encode``, ``decode``, ``evaluate``, ``demo``,
``summary``, ``convert-official``. Part 2 (issue #8) wires ``train``, ``generate``, ``train-controlnet``
and ``restore``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from medsynth_core.cli import UserError, Verb, add_train_arguments, demo_arguments, not_implemented, run_cli

PROG = "meddiffusion3d"
ISSUE = "#8"
DESCRIPTION = "3D MedDiffusion: patch-volume VQ autoencoder, BiFlowNet latent diffusion and ControlNet"


def _load_cfg(args: argparse.Namespace):
    from medsynth_core.config import load_config

    from .config import Config

    return load_config(Config, args.config, args.overrides)


# ----------------------------------------------------------------------------------------- train-ae
def _train_ae_args(p: argparse.ArgumentParser) -> None:
    add_train_arguments(p)
    p.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        required=True,
        help="1: patch-wise AE + GAN; 2: joint decoder on whole volumes (encoder/codebook frozen)",
    )
    p.add_argument(
        "--init",
        default=None,
        help="stage 2: stage-1 checkpoint to start from (default: latest of this run name's stage 1)",
    )


def _train_ae(args: argparse.Namespace) -> int:
    from .train_ae import train_ae

    path = train_ae(_load_cfg(args), args.stage, resume=args.resume, init=args.init)
    print(f"run folder: {path}")
    return 0


# ----------------------------------------------------------------------------------- encode/decode
def _ckpt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", required=True, help="autoencoder checkpoint (train-ae or convert-official)"
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def _encode_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--input", required=True, help="volume file, DICOM folder, or folder of volumes")
    p.add_argument("--out", required=True, help="output folder for <name>.latent.pt (+ PNG preview)")
    p.add_argument("--chunk", type=int, default=None, help="patches per encoder forward (memory bound)")
    p.add_argument(
        "--pad", action="store_true", help="pad volumes with background to a multiple of the patch"
    )


def _encode(args: argparse.Namespace) -> int:
    from .infer import encode_files
    from .train_ae import load_autoencoder

    ae, cfg, _ = load_autoencoder(args.checkpoint, args.device)
    for f in encode_files(ae, cfg, args.input, args.out, pad=args.pad, chunk=args.chunk, device=args.device):
        print(f)
    return 0


def _decode_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--input", required=True, help="a .latent.pt file or a folder of them")
    p.add_argument("--out", required=True, help="output folder for NIfTI volumes (+ PNG previews)")
    p.add_argument("--tile", type=int, default=None, help="latent tile edge (0: decode the whole latent)")
    p.add_argument("--overlap", type=float, default=None, help="tile overlap in [0, 1) (Gaussian blending)")


def _decode(args: argparse.Namespace) -> int:
    from .infer import decode_files
    from .train_ae import load_autoencoder

    ae, cfg, _ = load_autoencoder(args.checkpoint, args.device)
    for f in decode_files(
        ae, cfg, args.input, args.out, tile=args.tile, overlap=args.overlap, device=args.device
    ):
        print(f)
    return 0


# --------------------------------------------------------------------------------------- evaluate
def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="autoencoder checkpoint: reconstruction PSNR/SSIM/MAE")
    p.add_argument("--data", default=None, help="folder of volumes (default: the checkpoint config's data)")
    p.add_argument("--real", default=None, help="generation metrics: folder of real volumes")
    p.add_argument("--fake", default=None, help="generation metrics: folder of generated volumes")
    p.add_argument(
        "--med3d-weights", default=None, help="Med3D resnet_50_23dataset.pth (random backbone if absent)"
    )
    p.add_argument("--out", required=True, help="output folder for metrics.json and per_case.csv")
    p.add_argument("--device", default="cpu")


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from . import evaluate as E
    from .data import VolumeSource, list_volumes, load_volume

    summary: dict = {}
    rows: list = []
    if args.checkpoint:
        from .train_ae import load_autoencoder

        ae, cfg, _ = load_autoencoder(args.checkpoint, args.device)
        if args.data:
            files = list_volumes(args.data)
            vols = [torch.from_numpy(load_volume(f, cfg.data)[0]) for f in files]
            names = [f.name.split(".")[0] for f in files]
        else:
            src = VolumeSource(cfg.data, "val" if not cfg.data.synthetic else "train")
            vols = [torch.from_numpy(src[i]) for i in range(len(src))]
            names = src.names
        rec, rows = E.evaluate_reconstruction(
            ae,
            [v.to(args.device) for v in vols],
            names,
            cfg.data.patch,
            cfg.infer.chunk,
            cfg.infer.decode_tile,
            cfg.infer.decode_overlap,
        )
        summary["reconstruction"] = rec
    if args.real or args.fake:
        if not (args.real and args.fake):
            raise UserError("generation metrics need both --real and --fake folders")
        from .config import DataConfig

        dc = DataConfig(intensity="none")

        def load(folder):
            return torch.stack([torch.from_numpy(load_volume(f, dc)[0])[None] for f in list_volumes(folder)])

        real, fake = load(args.real), load(args.fake)
        net = E.med3d_resnet50(args.med3d_weights).to(args.device)
        from medsynth_core.metrics import extract_features

        fr = extract_features(net, [real[i : i + 1] for i in range(len(real))], args.device)
        ff = extract_features(net, [fake[i : i + 1] for i in range(len(fake))], args.device)
        summary["generation"] = {
            "fid": E.fid(fr, ff),
            "mmd": E.mmd(fr, ff),
            "ms_ssim_fake": E.pairwise_ms_ssim(fake),
            "n_real": len(real),
            "n_fake": len(fake),
            "med3d_weights": args.med3d_weights or "RANDOM (not comparable to the paper)",
        }
    if not summary:
        raise UserError("nothing to evaluate: pass --checkpoint and/or --real/--fake")
    path = E.write_report(args.out, summary, rows or None)
    print(json.dumps(summary, indent=2))
    print(f"written: {path}")
    return 0


# ------------------------------------------------------------------------------ demo/summary/convert
def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    m = run_demo(args.out)
    print(json.dumps({k: m[k] for k in ("stage1", "stage2", "total_seconds")}, indent=2))
    print(f"written: {args.out}/figure.png, {args.out}/metrics.json")
    return 0


def summarize(cfg) -> dict:
    from medsynth_core.training import count_parameters

    from .config import build_autoencoder, build_discriminator

    ae, disc = build_autoencoder(cfg.ae), build_discriminator(cfg.ae)
    p, ds, e = cfg.data.patch, cfg.ae.downsample, cfg.ae.embedding_dim
    return {
        "networks": {
            "autoencoder": count_parameters(ae),
            "encoder": count_parameters(ae.encoder),
            "decoder": count_parameters(ae.decoder),
            "pre_vq_conv": count_parameters(ae.pre_vq_conv),
            "post_vq_conv": count_parameters(ae.post_vq_conv),
            "codebook": {**count_parameters(ae.codebook), "buffers": [cfg.ae.n_codes, e]},
            "discriminator": count_parameters(disc),
        },
        "shapes": {
            "stage1_patch_in": [cfg.ae.stage1.batch, cfg.ae.image_channels, p, p, p],
            "latent_per_patch": [e, p // ds, p // ds, p // ds],
            "volume_256_latent": [e, 256 // ds, 256 // ds, 256 // ds],
            "decoder_out_per_patch": [cfg.ae.image_channels, p, p, p],
        },
    }


def _summary_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value")


def _summary(args: argparse.Namespace) -> int:
    print(json.dumps(summarize(_load_cfg(args)), indent=2))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="official PatchVolume Lightning checkpoint (.ckpt)")
    p.add_argument("dst", help="output medsynth checkpoint (.pt)")
    p.add_argument(
        "--official-config",
        default=None,
        help="official config/PatchVolume_*.yaml (needed when the .ckpt has no hyper_parameters)",
    )


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    print(json.dumps(convert_checkpoint(args.src, args.dst, args.official_config), indent=2))
    return 0


VERBS = [
    Verb("train", "train the BiFlowNet latent diffusion model (issue #8)", not_implemented(PROG, ISSUE)),
    Verb("train-ae", "train the patch-volume autoencoder (--stage 1|2)", _train_ae, _train_ae_args),
    Verb("encode", "encode volumes to normalised latent files", _encode, _encode_args),
    Verb("decode", "decode latent files to volumes (NIfTI + PNG)", _decode, _decode_args),
    Verb("train-controlnet", "train a ControlNet for a degraded-input task", not_implemented(PROG, ISSUE)),
    Verb("generate", "sample new volumes of a class and shape", not_implemented(PROG, ISSUE)),
    Verb("restore", "restore a degraded volume with a trained ControlNet", not_implemented(PROG, ISSUE)),
    Verb(
        "evaluate",
        "AE reconstruction PSNR/SSIM/MAE; FID/MMD/MS-SSIM of generated volumes",
        _evaluate,
        _evaluate_args,
    ),
    Verb(
        "demo",
        "train the AE stages briefly on the phantom, resume once, encode/decode, evaluate",
        _demo,
        demo_arguments(PROG),
    ),
    Verb(
        "summary", "print parameter counts and shapes of every network in a config", _summary, _summary_args
    ),
    Verb(
        "convert-official",
        "convert an official PatchVolume checkpoint to this package's format",
        _convert,
        _convert_args,
    ),
]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(PROG, DESCRIPTION, VERBS, argv)


if __name__ == "__main__":
    sys.exit(main())

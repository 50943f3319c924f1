"""Command line: ``meddiffusion3d VERB``.

Autoencoder (spec §1): ``train-ae``, ``encode``, ``decode``. Latent diffusion (spec §2–§3): ``train``
(BiFlowNet on cached latents), ``generate``. ControlNet (spec §4): ``train-controlnet``, ``restore``.
Shared: ``evaluate``, ``demo``, ``summary``, ``convert-official``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from medsynth_core.cli import (
    UserError,
    Verb,
    config_loader,
    demo_arguments,
    emit,
    run_cli,
    say,
    summary_verb,
    train_verb,
)

PROG = "meddiffusion3d"
DESCRIPTION = "3D MedDiffusion: patch-volume VQ autoencoder, BiFlowNet latent diffusion and ControlNet"


def _amp_key(key: str):
    """``--amp`` as the config key ``key`` (``ae.stage{stage}.amp`` takes the ``--stage`` given)."""
    return lambda args: (
        [f"{key.format(stage=getattr(args, 'stage', 1))}={args.amp}"] if getattr(args, "amp", None) else []
    )


_load_cfg = config_loader("meddiffusion3d.config:Config", __file__)
_load_train_cfg = config_loader("meddiffusion3d.config:Config", __file__, _amp_key("train.amp"))
_load_ae_cfg = config_loader("meddiffusion3d.config:Config", __file__, _amp_key("ae.stage{stage}.amp"))


def _amp_arg(p: argparse.ArgumentParser, key: str) -> None:
    p.add_argument(
        "--amp",
        choices=("off", "bf16", "fp16"),
        default=None,
        help=f"mixed precision on CUDA (= {key}=...; fp16 uses a GradScaler as the official trainer; "
        "CPU always runs fp32). Default: the config's value",
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    _amp_arg(p, "train.amp")


# ----------------------------------------------------------------------------------------- train-ae
def _train_ae_args(p: argparse.ArgumentParser) -> None:
    _amp_arg(p, "ae.stage<N>.amp")
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


def _run_train_ae(cfg, args: argparse.Namespace) -> dict:
    from .train_ae import train_ae

    return train_ae(cfg, args.stage, resume=args.resume, init=args.init)


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
    from medsynth_core.atomic import check_output_path

    from .infer import encode_files, load_autoencoder

    check_output_path(args.out, what="--out")  # before loading anything (issue 18)
    ae, cfg, _ = load_autoencoder(args.checkpoint, args.device)
    files = encode_files(ae, cfg, args.input, args.out, pad=args.pad, chunk=args.chunk, device=args.device)
    emit(args, {"written": [str(f) for f in files]})
    return 0


def _decode_args(p: argparse.ArgumentParser) -> None:
    _ckpt_args(p)
    p.add_argument("--input", required=True, help="a .latent.pt file or a folder of them")
    p.add_argument("--out", required=True, help="output folder for NIfTI volumes (+ PNG previews)")
    p.add_argument("--tile", type=int, default=None, help="latent tile edge (0: decode the whole latent)")
    p.add_argument("--overlap", type=float, default=None, help="tile overlap in [0, 1) (Gaussian blending)")


def _decode(args: argparse.Namespace) -> int:
    from medsynth_core.atomic import check_output_path

    from .infer import decode_files, load_autoencoder

    check_output_path(args.out, what="--out")
    ae, cfg, _ = load_autoencoder(args.checkpoint, args.device)
    files = decode_files(
        ae, cfg, args.input, args.out, tile=args.tile, overlap=args.overlap, device=args.device
    )
    emit(args, {"written": [str(f) for f in files]})
    return 0


# ------------------------------------------------------------------------------------ train (BiFlowNet)
def _run_train(cfg, args: argparse.Namespace) -> dict:
    from .train import train

    return train(cfg, resume=args.resume)


def _run_train_cn(cfg, args: argparse.Namespace) -> dict:
    from .train_controlnet import train_controlnet

    return train_controlnet(cfg, resume=args.resume)


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (NIfTI + PNG orthogonal views)")
    p.add_argument(
        "--ae-checkpoint", default=None, help="autoencoder (default: the one recorded at training)"
    )
    p.add_argument("--sampler", choices=("ddpm", "ddim"), default=None, help="default: diffusion.sampler")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: diffusion.sample_steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="BiFlowNet checkpoint (train or convert-official)")
    p.add_argument(
        "--class", dest="cls", required=True, help="class index or name (e.g. 1 or CTChestAbdomen)"
    )
    p.add_argument("--shape", type=int, nargs=3, required=True, metavar=("D", "H", "W"), help="volume shape")
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        default=(1.0, 1.0, 1.0),
        metavar=("SX", "SY", "SZ"),
        help="voxel spacing in mm written to the NIfTI (x, y, z; z is the D axis)",
    )
    p.add_argument("--n", type=int, default=1, help="number of volumes")
    _sample_args(p)


def _generate(args: argparse.Namespace) -> int:
    from .generate import Generator, write_volumes
    from .train import parse_class

    gen = Generator(args.checkpoint, args.ae_checkpoint, args.device)
    cls = parse_class(args.cls, gen.cfg.biflownet.classes, "--class")
    vols = gen.generate(cls, args.shape, args.n, args.seed, sampler=args.sampler, steps=args.steps)
    files = write_volumes(vols, args.out, f"class{cls}", args.spacing, gen.ae_cfg)
    emit(args, {"written": [str(f) for f in files]})
    return 0


def _restore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="ControlNet checkpoint (train-controlnet)")
    p.add_argument("--input", default=None, help="degraded volume (NIfTI/NRRD/MHA)")
    p.add_argument(
        "--target",
        default=None,
        help="clean volume: PSNR/SSIM reference; without --input it is degraded with the checkpoint's task",
    )
    p.add_argument(
        "--base", default=None, help="BiFlowNet checkpoint (default: the one recorded at training)"
    )
    _sample_args(p)


def _restore(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from medsynth_core.atomic import atomic_write_text

    from .data import load_volume
    from .generate import write_volumes
    from .restore import Restorer, restoration_metrics, simulate

    if not (args.input or args.target):
        raise UserError("restore needs --input (a degraded volume) and/or --target (a clean one to degrade)")
    r = Restorer(args.checkpoint, args.base, args.ae_checkpoint, args.device)
    dc = r.gen.ae_cfg.data
    src = args.input or args.target
    vol, img = load_volume(src, dc)
    target = None
    if args.target:
        t, _ = load_volume(args.target, dc)
        target = torch.from_numpy(t)[None, None].to(args.device)
    degraded = torch.from_numpy(vol)[None, None].to(args.device) if args.input else simulate(target, r.cfg)
    if target is not None and target.shape != degraded.shape:
        raise UserError(
            f"--target shape {tuple(target.shape[2:])} differs from --input {tuple(degraded.shape[2:])}"
        )
    restored = r.restore(degraded, args.seed, args.sampler, args.steps)
    spacing = np.abs(np.diag(img.affine)[:3])
    files = write_volumes(restored, args.out, "restored", spacing, r.gen.ae_cfg, img.affine)
    if not args.input:
        files += write_volumes(degraded, args.out, "degraded", spacing, r.gen.ae_cfg, img.affine)
    if target is not None:
        m = restoration_metrics(restored, target, degraded)
        atomic_write_text(Path(args.out) / "metrics.json", json.dumps(m, indent=2))
    emit(args, {**({"metrics": m} if target is not None else {}), "written": [str(f) for f in files]})
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
        from .infer import load_autoencoder

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
    emit(args, {**summary, "written": str(path)})
    return 0


# ------------------------------------------------------------------------------ demo/summary/convert
def _demo(args: argparse.Namespace) -> int:
    if not args.chain:
        from .learn import run_learning

        m = run_learning(args.out)
        short = {
            task: {k: b[k] for k in ("method", "baselines", "margin_db") if k in b}
            for task, b in m["heldout"].items()
        }
        short["generate"].update(
            {k: m["heldout"]["generate"][k] for k in ("classifier_accuracy", "fid", "mmd")}
        )
        emit(args, {"heldout": short, "seconds": m["train"]["seconds"]})
        say(args, f"written: {args.out}/metrics.json, {args.out}/heldout/, {args.out}/figure_*.png")
        return 0
    from .demo import run_demo

    m = run_demo(args.out)
    d = m["diffusion"]
    short = {k: d[k] for k in ("generated_shape", "generated_finite", "restore_task", "restore")}
    emit(
        args,
        {
            **{k: m[k] for k in ("stage1", "stage2")},
            "diffusion": short,
            "total_seconds": m["total_seconds"],
        },
    )
    say(args, f"written: {args.out}/figure.png, {args.out}/metrics.json")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    demo_arguments(PROG)(p)
    p.add_argument(
        "--chain",
        action="store_true",
        help="instead of the shown-to-learn recipe (configs/learn.yaml, ~9 min on two CPU threads), run the "
        "seconds-long smoke test of the whole chain (configs/demo.yaml: stage 1 resumed, stage 2, latents, "
        "BiFlowNet resumed, generate, ControlNet restore)",
    )


def summarize(cfg) -> dict:
    import torch

    from medsynth_core.training import count_parameters

    from .config import build_autoencoder, build_biflownet, build_discriminator
    from .controlnet import ControlNet

    ae, disc = build_autoencoder(cfg.ae), build_discriminator(cfg.ae)
    p, ds, e = cfg.data.patch, cfg.ae.downsample, cfg.ae.embedding_dim
    with torch.device("meta"):  # counts only: no memory, no init cost (157 M + 93 M parameters at paper size)
        bf = build_biflownet(cfg.biflownet)
        cc = cfg.controlnet
        cn = ControlNet(bf.config, cc.hint_channels, cc.variant)
    lat = [256 // ds] * 3
    lat = [-(-s // m) * m for s, m in zip(lat, bf.shape_multiple)]
    return {
        "networks": {
            "biflownet": {**count_parameters(bf), "dit_path": bf.dit_parameters()},
            f"controlnet_{cc.variant}": count_parameters(cn),
            "autoencoder": count_parameters(ae),
            "encoder": count_parameters(ae.encoder),
            "decoder": count_parameters(ae.decoder),
            "pre_vq_conv": count_parameters(ae.pre_vq_conv),
            "post_vq_conv": count_parameters(ae.post_vq_conv),
            "codebook": {**count_parameters(ae.codebook), "buffers": [cfg.ae.n_codes, e]},
            "discriminator": count_parameters(disc),
        },
        "shapes": {
            "stage1_patch_in": [cfg.ae.stage1.batch_size, cfg.ae.image_channels, p, p, p],
            "latent_per_patch": [e, p // ds, p // ds, p // ds],
            "volume_256_latent": [e, 256 // ds, 256 // ds, 256 // ds],
            "decoder_out_per_patch": [cfg.ae.image_channels, p, p, p],
            "biflownet_in_out": [cfg.train.batch_size, cfg.biflownet.channels, *lat],
            "biflownet_latent_multiple": list(bf.shape_multiple),
            "controlnet_hint": [cfg.train.batch_size, cc.hint_channels, *lat],
            "controlnet_controls": len(cn.level_channels) + 1,
        },
    }


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "src",
        help="official PatchVolume Lightning checkpoint (.ckpt) or BiFlowNet training checkpoint (.pt), read "
        "without unpickling code (weights_only)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a file that holds pickled objects beyond tensors with full pickle (can run code: only "
        "for files you trust)",
    )
    p.add_argument("dst", help="output medsynth checkpoint (.pt)")
    p.add_argument(
        "--official-config",
        default=None,
        help="official config/PatchVolume_*.yaml (needed when the .ckpt has no hyper_parameters); for BiFlowNet "
        "a JSON/YAML of the official BiFlowNet(...) constructor kwargs when they differ from the script defaults",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="BiFlowNet: config overrides (biflownet.k=v)"
    )


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    emit(
        args, convert_checkpoint(args.src, args.dst, args.official_config, args.overrides, args.trust_pickle)
    )
    return 0


VERBS = [
    train_verb(
        PROG,
        _load_train_cfg,
        _run_train,
        help="train BiFlowNet on cached latents (train.latents + train.manifest)",
        add_arguments=_train_args,
    ),
    train_verb(
        PROG,
        _load_ae_cfg,
        _run_train_ae,
        name="train-ae",
        help="train the patch-volume autoencoder (--stage 1|2)",
        add_arguments=_train_ae_args,
    ),
    Verb("encode", "encode volumes to normalised latent files", _encode, _encode_args),
    Verb("decode", "decode latent files to volumes (NIfTI + PNG)", _decode, _decode_args),
    train_verb(
        PROG,
        _load_cfg,
        _run_train_cn,
        name="train-controlnet",
        help="train a ControlNet for a degraded-input task (controlnet.base, controlnet.task)",
    ),
    Verb("generate", "sample new volumes of a class and shape (NIfTI + PNG)", _generate, _generate_args),
    Verb("restore", "restore a degraded volume with a trained ControlNet", _restore, _restore_args),
    Verb(
        "evaluate",
        "AE reconstruction PSNR/SSIM/MAE; FID/MMD/MS-SSIM of generated volumes",
        _evaluate,
        _evaluate_args,
    ),
    Verb(
        "demo",
        "train AE, BiFlowNet and ControlNets on phantoms and score them on held-out subjects "
        "(--chain: seconds-long smoke test of the whole chain)",
        _demo,
        _demo_args,
    ),
    summary_verb(_load_cfg, summarize),
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

"""``meddiffusion3d demo --chain``: seconds-long smoke test of the whole chain on the 32³ phantoms (spec §8, checklist 15).

AE stage 1 (half the steps, then a resume from the checkpoint for the rest) → stage 2 → encode the
phantoms to normalised latent files (+ class manifest) → decode one back → BiFlowNet on the latents (half,
then resume) → generate one volume per class (DDIM, EMA weights) → decode → ControlNet fine-tuning for
thick-slice super-resolution → restore a degraded phantom. ``figure.png`` shows input / stage-1 / stage-2
reconstructions / generated volumes / degraded / restored, ``metrics.json`` the numbers.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from medsynth_core import io as mio
from medsynth_core.atomic import atomic_write_text
from medsynth_core.config import bundled_configs, load_config
from medsynth_core.viz import save_volume_views

from .config import Config
from .encode import LatentNorm
from .evaluate import evaluate_reconstruction
from .infer import decode_files, encode_files, load_autoencoder
from .train_ae import latest_checkpoint, train_ae

DEMO_CONFIG = bundled_configs(__file__) / "demo.yaml"


def run_demo(out: str | Path, config: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = [f"run.root={out / 'runs'}"] + list(overrides or [])
    cfg = load_config(Config, config or DEMO_CONFIG, base)
    torch.set_num_threads(max(1, cfg.run.threads or 1))
    s1 = cfg.ae.stage1.steps
    half = load_config(Config, config or DEMO_CONFIG, base + [f"ae.stage1.steps={max(1, s1 // 2)}"])
    train_ae(half, 1)  # first half, checkpointed
    train_ae(cfg, 1)  # resumes from that checkpoint automatically
    ck1 = latest_checkpoint(cfg, 1)
    train_ae(cfg, 2)  # joint decoder from the stage-1 checkpoint
    ck2 = latest_checkpoint(cfg, 2)
    t_train = time.perf_counter() - t0

    ae1, _, _ = load_autoencoder(ck1)
    ae2, cfg2, ck = load_autoencoder(ck2)
    from medsynth_core.phantoms import classed_volumes

    # one phantom per class (the training phantoms cycle through the classes)
    vols = classed_volumes(cfg.data.n_classes, cfg.data.volume, n_classes=cfg.data.n_classes, seed=0).volumes
    names = [f"phantom_{i:03d}" for i in range(len(vols))]
    tensors = [torch.from_numpy(v) for v in vols]
    m1, _ = evaluate_reconstruction(ae1, tensors, names, cfg.data.patch, cfg.infer.chunk, keep=1)
    m2, rows = evaluate_reconstruction(ae2, tensors, names, cfg.data.patch, cfg.infer.chunk, keep=1)

    # file round trip: NIfTI → latent file → NIfTI (geometry kept)
    nii_dir, lat_dir, dec_dir = out / "inputs", out / "latents", out / "decoded"
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    mio.write_image(mio.MedicalImage.from_dhw(vols[0], affine), nii_dir / "phantom_000.nii.gz")
    lat = encode_files(ae2, cfg2, nii_dir, lat_dir)
    dec = decode_files(ae2, cfg2, lat_dir, dec_dir)
    back = mio.read_image(dec[0])
    roundtrip_ok = bool(np.allclose(back.affine, affine) and back.to_dhw().shape == vols[0].shape)
    latent = torch.load(lat[0], weights_only=True)
    norm = LatentNorm(*latent["norm"])
    t_ae = time.perf_counter() - t0

    diffusion = _diffusion_chain(out, cfg, base, config or DEMO_CONFIG, ck2, tensors[0])

    save_volume_views(
        out / "figure.png",
        [tensors[0], m1.pop("recons")[0], m2.pop("recons")[0], *diffusion.pop("views")],
        titles=[
            "phantom",
            f"stage 1 ({m1['psnr_mean']:.1f} dB)",
            f"stage 2 ({m2['psnr_mean']:.1f} dB)",
            *diffusion.pop("titles"),
        ],
        value_range=(-1.0, 1.0),
        scale=4,
    )
    metrics = {
        "stage1": {k: m1[k] for k in ("psnr_mean", "ssim_mean", "mae_mean")},
        "stage2": {k: m2[k] for k in ("psnr_mean", "ssim_mean", "mae_mean")},
        "per_case_stage2": rows,
        "latent_shape": list(latent["latent"].shape),
        "latent_norm": {"codebook_min": norm.lo, "codebook_max": norm.hi, **latent["range"]},
        "latent_norm_roundtrip_max_err": float(
            (norm.denorm(norm.norm(latent["latent"])) - latent["latent"]).abs().max()
        ),
        "nifti_roundtrip_geometry_ok": roundtrip_ok,
        "steps": {"stage1": cfg.ae.stage1.steps, "stage2": cfg.ae.stage2.steps, "resumed_stage1_at": s1 // 2},
        "checkpoints": {"stage1": str(ck1), "stage2": str(ck2)},
        "diffusion": diffusion,
        "train_seconds": round(t_train, 2),
        "ae_seconds": round(t_ae, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "note": "a few CPU steps on 4 phantoms: the numbers show the pipeline runs, not paper quality "
        "(the generated and restored volumes are not expected to look like phantoms)",
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _diffusion_chain(
    out: Path, cfg: Config, base: list[str], config, ae_ckpt: Path, clean: torch.Tensor
) -> dict:
    """Latents of every training phantom → BiFlowNet (half + resume) → generate → ControlNet → restore."""
    from medsynth_core.phantoms import classed_volumes

    from .generate import Generator, write_volumes
    from .restore import Restorer, restoration_metrics, simulate
    from .train import latest_checkpoint as latest_bf
    from .train import train
    from .train_controlnet import latest_checkpoint as latest_cn
    from .train_controlnet import train_controlnet

    t0 = time.perf_counter()
    cv = classed_volumes(cfg.data.n_volumes, cfg.data.volume, n_classes=cfg.data.n_classes, seed=0)
    vol_dir, lat_dir = out / "train_volumes", out / "train_latents"
    for i, v in enumerate(cv.volumes):
        mio.write_image(mio.MedicalImage.from_dhw(v, np.eye(4)), vol_dir / f"phantom_{i:03d}.nii.gz")
    ae, ae_cfg, _ = load_autoencoder(ae_ckpt)
    encode_files(ae, ae_cfg, vol_dir, lat_dir)
    manifest = out / "classes.csv"
    atomic_write_text(
        manifest, "name,class\n" + "".join(f"phantom_{i:03d},{int(c)}\n" for i, c in enumerate(cv.labels))
    )
    part2 = base + [f"train.latents={lat_dir}", f"train.manifest={manifest}", f"train.autoencoder={ae_ckpt}"]
    steps = cfg.train.steps
    train(load_config(Config, config, part2 + [f"train.steps={max(1, steps // 2)}"]))
    c2 = load_config(Config, config, part2)
    train(c2)  # resumes from the half-way checkpoint
    ck_bf = latest_bf(c2)
    t_bf = time.perf_counter() - t0

    gen = Generator(ck_bf)
    vols = [
        gen.generate(c, cfg.data.volume, 1, seed=c, show_progress=False) for c in range(cfg.biflownet.classes)
    ]
    generated = torch.cat(vols)
    files = write_volumes(generated, out / "generated", "sample", (1.0, 1.0, 1.0), gen.ae_cfg)
    t_gen = time.perf_counter() - t0 - t_bf

    c3 = load_config(Config, config, part2 + [f"controlnet.base={ck_bf}"])
    train_controlnet(c3)
    ck_cn = latest_cn(c3)
    rest = Restorer(ck_cn)
    target = clean[None, None].float()
    degraded = simulate(target, c3)
    restored = rest.restore(degraded, seed=0, show_progress=False)
    rm = restoration_metrics(restored, target, degraded)
    task = c3.controlnet.task
    return {
        "generated_shape": list(generated.shape),
        "generated_finite": bool(torch.isfinite(generated).all()),
        "generated_range": [float(generated.min()), float(generated.max())],
        "generated_files": [str(f) for f in files],
        "restored_shape": list(restored.shape),
        "restored_finite": bool(torch.isfinite(restored).all()),
        "restore_task": task,
        "restore": rm,
        "steps": {
            "biflownet": steps,
            "resumed_biflownet_at": max(1, steps // 2),
            "controlnet": c3.controlnet.steps,
            "sampler": c2.diffusion.sampler,
            "sample_steps": c2.diffusion.sample_steps,
        },
        "checkpoints": {"biflownet": str(ck_bf), "controlnet": str(ck_cn)},
        "seconds": {
            "biflownet_train": round(t_bf, 2),
            "generate": round(t_gen, 2),
            "controlnet_and_restore": round(time.perf_counter() - t0 - t_bf - t_gen, 2),
        },
        "views": [*(v[0, 0] for v in vols), degraded[0, 0], restored[0, 0]],
        "titles": [
            *(f"generated class {c}" for c in range(len(vols))),
            f"degraded ({task})",
            f"restored ({rm['psnr']:.1f} dB)",
        ],
    }

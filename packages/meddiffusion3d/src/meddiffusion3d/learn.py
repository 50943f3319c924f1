"""``meddiffusion3d demo``: the three stages trained from scratch and shown to learn on held-out phantoms
(``../shared/LEARNING.md``, issue 16).

Training phantoms are ``classed_volumes(seed=data.phantom_seed)``, the held-out ones ``seed=HELDOUT_SEED``
(disjoint subjects). One run of :func:`run_learning` (``configs/learn.yaml``):

1. **AE**: stage 1 (patches cropped from the volumes held in memory) then stage 2 (joint decoder, frozen
   encoder/codebook); held-out reconstruction vs ``avgpool_trilinear`` (average-pool by the compression
   factor, trilinear back); SSIM and the codebook perplexity on the held-out latents.
2. **Latent cache**: every training phantom encoded once with the frozen AE (``*.latent.pt``).
3. **Generation**: BiFlowNet (class + resolution conditioned) on the cached latents; ``N_PER_CLASS`` samples
   per class; nearest-centroid accuracy (centroids of the 8³-downsampled held-out volumes), FID/MMD against
   the held-out set vs ``random_latent`` (per-channel Gaussian of the training latents, same AE decoder).
4. **ControlNet** per degradation (sparse-view CT via FBP, undersampled k-space zero-filled) from cached
   (latent, hint) pairs; held-out restoration vs the ``degraded`` input and ``ae_of_degraded`` (the AE's
   reconstruction of the degraded input).

Output: ``heldout/{ae,generate,controlnet_<task>}/<case>/<role>.nii.gz`` (intensities in [0, 1], what
was scored), ``figure_ae.png``, ``figure_generate.png``, ``figure_controlnet.png`` (three orthogonal
mid-slices per volume) and ``metrics.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsynth_core import heldout as H
from medsynth_core import io as mio
from medsynth_core.atomic import atomic_write_text
from medsynth_core.config import bundled_configs, load_config
from medsynth_core.viz import save_volume_views

from .config import Config

LEARN_CONFIG = bundled_configs(__file__) / "learn.yaml"
HELDOUT_SEED = 1000  # held-out phantom subjects (training: data.phantom_seed)
HELDOUT_CASES = 4  # per class for generation statistics; AE / ControlNet cases in total
N_PER_CLASS = 8  # generated samples per class
# the degradations the package offers, at a strength the AE can beat (on 32³ phantoms: 8 views → ~17.6 dB,
# 4× k-space → ~16.3 dB)
TASK_PARAMS = {
    "sparse_view_ct": {"n_views": 8},
    "kspace": {"acceleration": 4, "center_fraction": 0.08, "seed": 0},
}
TASKS = tuple(TASK_PARAMS)
# ours >= baseline + margin (dB)
MARGINS = {
    "ae": {"avgpool_trilinear": 2.0},
    "controlnet": {"degraded": 1.0, "ae_of_degraded": 0.0},
}
CLASSIFIER_MIN = 0.8


def learn_config(overrides: list[str] | None = None) -> Config:
    return load_config(Config, LEARN_CONFIG, list(overrides or []))


def unit(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Model range [-1, 1] → metric range [0, 1] (``(D, H, W)`` numpy)."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    a = a.reshape(a.shape[-3:])
    return np.clip((a + 1.0) / 2.0, 0.0, 1.0)


def heldout_volumes(cfg: Config, n: int) -> tuple[np.ndarray, np.ndarray]:
    from medsynth_core.phantoms import classed_volumes

    cv = classed_volumes(n, cfg.data.volume, n_classes=cfg.data.n_classes, seed=HELDOUT_SEED)
    return cv.volumes, cv.labels


def downsampled(vols: torch.Tensor, size: int = 8) -> torch.Tensor:
    """(N, 1, D, H, W) → (N, size³) average-pooled feature vectors (the classifier's features)."""
    return F.adaptive_avg_pool3d(vols.float(), size).flatten(1)


def nearest_centroid(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    classes = sorted(set(int(c) for c in train_y))
    cents = torch.stack([train_x[train_y == c].mean(0) for c in classes])
    return torch.tensor(classes)[torch.cdist(x, cents).argmin(1)]


# ---------------------------------------------------------------------------------------------- stage 1
def _ae_stage(out: Path, cfg: Config) -> tuple[dict, Path]:
    from .encode import patch_encode
    from .evaluate import reconstruct
    from .infer import load_autoencoder
    from .train_ae import latest_checkpoint, train_ae

    t0 = time.perf_counter()
    train_ae(cfg, 1)
    t1 = time.perf_counter()
    train_ae(cfg, 2)
    t2 = time.perf_counter()
    ck = latest_checkpoint(cfg, 2)
    ae, ae_cfg, _ = load_autoencoder(ck)
    vols, labels = heldout_volumes(cfg, HELDOUT_CASES)
    task = H.HeldoutTask(out / "heldout", "ae")
    views, titles, codes = [], [], []
    with torch.no_grad():
        for i, v in enumerate(vols):
            x = torch.from_numpy(v)[None, None]
            y = reconstruct(ae, x, cfg.data.patch, cfg.infer.chunk).clamp(-1, 1)
            codes.append(ae.codebook.indices(patch_encode(ae, x, cfg.data.patch, chunk=cfg.infer.chunk)))
            t = unit(x)
            base = H.avgpool_upsample(t, ae.downsample)
            r = task.add_case(f"case{i:02d}", t, unit(y), {"avgpool_trilinear": base})
            views += [t, base, unit(y)]
            titles += [
                f"case{i:02d} target (class {labels[i]})",
                f"avgpool_trilinear {r['baselines']['avgpool_trilinear']['psnr_db']:.1f} dB",
                f"ours {r['method']['psnr_db']:.1f} dB",
            ]
    counts = torch.bincount(torch.cat([c.flatten() for c in codes]), minlength=ae.codebook.n_codes).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
    task.extra.update(
        {
            "codebook": {
                "n_codes": ae.codebook.n_codes,
                "heldout_perplexity": perplexity,
                "heldout_codes_used": int((counts > 0).sum()),
            },
            "compression_factor": ae.downsample,
        }
    )
    save_volume_views(out / "figure_ae.png", views, titles=titles, value_range=(0.0, 1.0), scale=4)
    info = {
        "block": task.summary(),
        "train": {
            "stage1_steps": cfg.ae.stage1.steps,
            "stage2_steps": cfg.ae.stage2.steps,
            "stage1_seconds": round(t1 - t0, 1),
            "stage2_seconds": round(t2 - t1, 1),
            "final_perplexity_train": _last_log(cfg, "stage1", "perplexity"),
        },
    }
    return info, ck


def _last_log(cfg: Config, sub: str, key: str) -> float | None:
    f = Path(cfg.run.root) / "meddiffusion3d" / cfg.run.name / sub / "metrics.jsonl"
    if not f.is_file():
        return None
    val = None
    for line in f.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in row.items():
            if k.endswith(key) and isinstance(v, (int, float)):
                val = float(v)
    return val


# --------------------------------------------------------------------------------------- latent cache
def _cache_latents(out: Path, cfg: Config, ae_ckpt: Path) -> tuple[Path, Path, dict]:
    from medsynth_core.phantoms import classed_volumes

    from .infer import encode_files, load_autoencoder

    cv = classed_volumes(
        cfg.data.n_volumes, cfg.data.volume, n_classes=cfg.data.n_classes, seed=cfg.data.phantom_seed
    )
    vol_dir, lat_dir = out / "train_volumes", out / "train_latents"
    for i, v in enumerate(cv.volumes):
        mio.write_image(mio.MedicalImage.from_dhw(v, np.eye(4)), vol_dir / f"phantom_{i:03d}.nii.gz")
    ae, ae_cfg, _ = load_autoencoder(ae_ckpt)
    t0 = time.perf_counter()
    encode_files(ae, ae_cfg, vol_dir, lat_dir)
    t_encode = time.perf_counter() - t0
    manifest = out / "classes.csv"
    atomic_write_text(
        manifest, "name,class\n" + "".join(f"phantom_{i:03d},{int(c)}\n" for i, c in enumerate(cv.labels))
    )
    return lat_dir, manifest, {"encode_seconds": round(t_encode, 2), "volumes": len(cv.volumes)}


# ------------------------------------------------------------------------------------------ generation
def _random_latents(lat_dir: Path, n: int, seed: int) -> torch.Tensor:
    from .infer import read_latent

    z = torch.stack([read_latent(f)["latent"].float() for f in sorted(lat_dir.glob("*.latent.pt"))])
    mu = z.mean(dim=(0, 2, 3, 4))
    sd = z.std(dim=(0, 2, 3, 4))
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn((n, *z.shape[1:]), generator=g)
    return eps * sd.view(1, -1, 1, 1, 1) + mu.view(1, -1, 1, 1, 1)


def _generate_stage(out: Path, cfg: Config, bf_ckpt: Path, lat_dir: Path) -> dict:
    from .evaluate import fid, med3d_resnet50, mmd
    from .generate import Generator

    gen = Generator(bf_ckpt)
    n_cls = cfg.biflownet.classes
    real, real_y = heldout_volumes(cfg, HELDOUT_CASES * n_cls)
    real_t = torch.from_numpy(real)[:, None]
    ours, ys = [], []
    t0 = time.perf_counter()
    for c in range(n_cls):
        ours.append(gen.generate(c, cfg.data.volume, N_PER_CLASS, seed=100 + c, show_progress=False))
        ys += [c] * N_PER_CLASS
    t_gen = time.perf_counter() - t0
    ours_t = torch.cat(ours)
    y = torch.tensor(ys)
    rand_t = gen.decode(_random_latents(lat_dir, len(ys), seed=7))
    feat_real = downsampled(real_t)
    acc = {
        name: float(
            (nearest_centroid(feat_real, torch.from_numpy(real_y), downsampled(v)) == y).float().mean()
        )
        for name, v in (("method", ours_t), ("random_latent", rand_t))
    }
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.manual_seed(0)  # the random MedicalNet init (no weights offline) is seed 0
        net = med3d_resnet50(None)
    torch.manual_seed(0)
    with torch.no_grad():

        def feats(v: torch.Tensor) -> torch.Tensor:
            return torch.cat([net(v[i : i + 4].float()) for i in range(0, len(v), 4)]).flatten(1).double()

        fr, fo, fz = feats(real_t), feats(ours_t), feats(rand_t)
    dist = {
        "fid": {"method": fid(fo, fr), "random_latent": fid(fz, fr)},
        "mmd": {"method": mmd(fo, fr), "random_latent": mmd(fz, fr)},
        "feature_extractor": "MedicalNet 3D ResNet-50 (shortcut B, dilated layer3/4), random weights (seed 0)",
    }
    # files: sample i of class c against held-out real volume i of class c (PSNR is a similarity, no margin)
    task = H.HeldoutTask(out / "heldout", "generate")
    views, titles = [], []
    for c in range(n_cls):
        real_c = [k for k in range(len(real_y)) if real_y[k] == c]
        for j in range(N_PER_CLASS):
            i = c * N_PER_CLASS + j
            tgt = unit(real_t[real_c[j % len(real_c)]])
            task.add_case(f"class{c}_sample{j:02d}", tgt, unit(ours_t[i]), {"random_latent": unit(rand_t[i])})
            if j < 2:
                views += [unit(ours_t[i])]
                titles += [f"ours class {c} #{j}"]
        views += [unit(rand_t[c * N_PER_CLASS]), unit(real_t[real_c[0]])]
        titles += [f"random_latent #{c * N_PER_CLASS}", f"real held-out class {c}"]
    task.extra.update(
        {
            "classifier": "nearest centroid on 8^3 average-pooled held-out real volumes",
            "classifier_accuracy": acc,
            "samples_per_class": N_PER_CLASS,
            "real_heldout_volumes": len(real_t),
            **dist,
            "note": "psnr_db here compares each sample with a held-out real volume of its class (a similarity, "
            "not a margin); the margins are classifier_accuracy, fid and mmd",
        }
    )
    save_volume_views(out / "figure_generate.png", views, titles=titles, value_range=(0.0, 1.0), scale=4)
    return {"block": task.summary(), "seconds": {"generate": round(t_gen, 1)}}


# ------------------------------------------------------------------------------------------ controlnet
def _controlnet_stage(out: Path, cfg: Config, base_overrides: list[str], bf_ckpt: Path, ae_ckpt: Path):
    from .evaluate import reconstruct
    from .infer import load_autoencoder
    from .restore import Restorer, simulate
    from .train_controlnet import latest_checkpoint as latest_cn
    from .train_controlnet import train_controlnet

    ae, _, _ = load_autoencoder(ae_ckpt)
    vols, labels = heldout_volumes(cfg, HELDOUT_CASES)
    blocks, secs, views, titles = {}, {}, [], []
    # the ControlNet's output is decoded by this AE: its reconstruction of the clean target bounds the restoration
    ceiling = []
    for v in vols:
        x = torch.from_numpy(v)[None, None]
        with torch.no_grad():
            rec = reconstruct(ae, x, cfg.data.patch, cfg.infer.chunk).clamp(-1, 1)
        mse = float(np.mean((unit(rec) - unit(x)) ** 2))
        ceiling.append(round(10 * np.log10(1.0 / max(mse, 1e-12)), 3))
    params = TASK_PARAMS
    for task_name in TASKS:
        c = load_config(
            Config,
            LEARN_CONFIG,
            base_overrides
            + [f"controlnet.base={bf_ckpt}", f"controlnet.task={task_name}"]
            + [f"controlnet.task_params.{k}={v}" for k, v in params[task_name].items()],
        )
        t0 = time.perf_counter()
        train_controlnet(c)
        t_train = time.perf_counter() - t0
        rest = Restorer(latest_cn(c))
        task = H.HeldoutTask(out / "heldout", f"controlnet_{task_name}")
        for i, v in enumerate(vols):
            x = torch.from_numpy(v)[None, None]
            d = simulate(x, c)
            with torch.no_grad():
                r = rest.restore(d, seed=i, show_progress=False)
                a = reconstruct(ae, d, cfg.data.patch, cfg.infer.chunk).clamp(-1, 1)
            res = task.add_case(
                f"case{i:02d}", unit(x), unit(r), {"degraded": unit(d), "ae_of_degraded": unit(a)}
            )
            if i < 2:
                views += [unit(x), unit(d), unit(a), unit(r)]
                titles += [
                    f"{task_name} case{i:02d} target",
                    f"degraded {res['baselines']['degraded']['psnr_db']:.1f} dB",
                    f"ae_of_degraded {res['baselines']['ae_of_degraded']['psnr_db']:.1f} dB",
                    f"restored {res['method']['psnr_db']:.1f} dB",
                ]
        task.extra["task_params"] = dict(params[task_name])
        task.extra["ae_of_target_psnr_db"] = {"per_case": ceiling, "mean": round(float(np.mean(ceiling)), 3)}
        task.extra["case_labels"] = [int(c) for c in labels]
        blocks[f"controlnet_{task_name}"] = task.summary()
        secs[task_name] = {"train": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)}
    save_volume_views(out / "figure_controlnet.png", views, titles=titles, value_range=(0.0, 1.0), scale=4)
    return blocks, secs


# ------------------------------------------------------------------------------------------------ run
def run_learning(out: str | Path, overrides: list[str] | None = None) -> dict:
    """Train all three stages with ``configs/learn.yaml`` and score them on held-out phantoms."""
    from medsynth_core.training import num_threads

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"run.root={out / 'runs'}"] + list(overrides or [])
    cfg = learn_config(base)
    with num_threads(max(1, cfg.run.threads or 1)):
        return _run_stages(out, cfg, base)


def _run_stages(out: Path, cfg: Config, base: list[str]) -> dict:
    from .train import latest_checkpoint as latest_bf
    from .train import train

    t_all = time.perf_counter()
    ae_info, ae_ckpt = _ae_stage(out, cfg)
    t_ae = time.perf_counter() - t_all

    lat_dir, manifest, cache = _cache_latents(out, cfg, ae_ckpt)
    part2 = base + [f"train.latents={lat_dir}", f"train.manifest={manifest}", f"train.autoencoder={ae_ckpt}"]
    c2 = learn_config(part2)
    t0 = time.perf_counter()
    train(c2)
    t_bf = time.perf_counter() - t0
    bf_ckpt = latest_bf(c2)
    gen_info = _generate_stage(out, c2, bf_ckpt, lat_dir)
    t_gen_stage = time.perf_counter() - t0

    t0 = time.perf_counter()
    cn_blocks, cn_secs = _controlnet_stage(out, c2, part2, bf_ckpt, ae_ckpt)
    t_cn = time.perf_counter() - t0

    heldout = {"ae": ae_info["block"], "generate": gen_info["block"], **cn_blocks}
    train_info = {
        "ae": ae_info["train"],
        "latent_cache": cache,
        "biflownet": {"steps": c2.train.steps, "seconds": round(t_bf, 1)},
        "controlnet": {"steps": c2.controlnet.steps, "seconds": cn_secs},
        "stage_seconds": {
            "ae": round(t_ae, 1),
            "generate": round(t_gen_stage, 1),
            "controlnet": round(t_cn, 1),
        },
        "seconds": round(time.perf_counter() - t_all, 1),
        "threads": torch.get_num_threads(),
    }
    doc = H.write_metrics(out / "metrics.json", heldout, train=train_info, margins=MARGINS)
    return doc

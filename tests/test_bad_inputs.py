"""Issue 18: the shared bad-input matrix (medsynth_core.testing) against the inference verbs: every damaged
image or checkpoint exits 2 with exactly one line on stderr naming the file, never a traceback, and
writes nothing: fda-vae synthesize, drdm augment, uni-coal synthesize, mgdcr reconstruct, meddiffusion3d encode."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medsynth_core.testing import CHECKPOINT_CASES, IMAGE_CASES, bad_checkpoint_files, bad_image_files

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A real one-step checkpoint of each package (random initialisation, tiny configs)."""
    from drdm.config import load as drdm_load
    from drdm.train import train as drdm_train
    from fda_vae.config import Config
    from fda_vae.train import train as fda_train
    from medsynth_core.config import load_config

    tmp = tmp_path_factory.mktemp("ckpts")
    torch.set_num_threads(1)
    fda_over = [f"run.root={tmp}", "model.channels=[8,16]", "model.latent_channels=4", "train.batch_size=2",
                "data.image_size=16", "data.phantom_train=4", "data.phantom_val=2", "data.phantom_size=32",
                "train.steps=1", "train.val_every=1000", "train.sample_every=1000"]  # fmt: skip
    fda = fda_train(load_config(Config, REPO / "packages/fda-vae/configs/demo.yaml", fda_over))["checkpoint"]
    dr = drdm_train(drdm_load("demo", [f"run.root={tmp}", "train.steps=1", "data.phantom_count=2",
                                       "train.batch_size=1", "train.sample_every=1000"]))  # fmt: skip
    from meddiffusion3d.config import Config as MDConfig
    from meddiffusion3d.config import build_autoencoder
    from medsynth_core import checkpoint as C
    from medsynth_core.config import config_to_dict
    from mgdcr.cli import main as mgdcr_main
    from uni_coal.config import Config as UCConfig
    from uni_coal.model import UniCOALGenerator

    torch.manual_seed(0)
    uc_cfg = load_config(UCConfig, REPO / "packages/uni-coal/configs/demo.yaml")
    uc = C.build_checkpoint(kind="uni-coal", step=0, models={"G_ema": UniCOALGenerator(uc_cfg.generator)},
                            config=config_to_dict(uc_cfg), include_rng=False)  # fmt: skip
    md_cfg = load_config(MDConfig, REPO / "packages/meddiffusion3d/configs/demo.yaml")
    md = C.build_checkpoint(kind="meddiffusion3d-ae", step=0, models={"ae": build_autoencoder(md_cfg.ae)},
                            config=config_to_dict(md_cfg), include_rng=False)  # fmt: skip
    micro = ["train", "--config", str(REPO / "packages/mgdcr/configs/micro.yaml"), f"run.root={tmp}",
             "train.steps=1", "train.ckpt_every=1", "train.sample_every=0"]  # fmt: skip
    assert mgdcr_main(micro) == 0
    return {"fda_vae": Path(fda), "drdm": Path(dr["run_dir"]) / "checkpoints" / "step_00000001.pt",
            "uni_coal": C.atomic_torch_save(uc, tmp / "uni_coal.pt"),
            "meddiffusion3d": C.atomic_torch_save(md, tmp / "md3d_ae.pt"),
            "mgdcr": tmp / "mgdcr" / "micro" / "checkpoints" / "step_00000001.pt"}  # fmt: skip


def _argv(module: str, ckpt: Path, image: Path, out: Path) -> list[str]:
    if module == "fda_vae":
        return ["synthesize", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out / "o.nii.gz")]
    if module == "uni_coal":
        return ["synthesize", "--checkpoint", str(ckpt), "--input", str(image), "--output", str(out / "o.nii.gz"),
                "--target", "PD"]  # fmt: skip
    if module == "mgdcr":  # the damaged file as the SAX cine and as the LAX plane
        return ["reconstruct", "--checkpoint", str(ckpt), "--sax", str(image), "--lax", str(image), "--out", str(out)]
    if module == "meddiffusion3d":
        return ["encode", "--checkpoint", str(ckpt), "--input", str(image), "--out", str(out)]
    # drdm augment reads a folder: the bad file alone in it (a folder case is the folder itself)
    folder = image if image.is_dir() else image.parent / f"only_{image.name}"
    if not image.is_dir():
        folder.mkdir(exist_ok=True)
        target = folder / image.name
        if image.exists() and not target.exists():
            target.write_bytes(image.read_bytes())
        if not image.exists():
            folder = image.parent / "missing_folder"
    return ["augment", "--checkpoint", str(ckpt), "--images", str(folder), "--out", str(out),
            "augment.aug_coe=1", "augment.start_noise_step=2"]  # fmt: skip


def _check(capsys, rc: int, prog: str, verb: str, names: str, out: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog} {verb}: error: "), err
    assert names in lines[0] and "Traceback" not in err, err
    assert not out.exists() or not any(out.rglob("*.nii*")), sorted(out.rglob("*"))
    assert not out.exists() or not any(out.rglob("*.pt")), sorted(out.rglob("*"))
    return lines[0]


PACKAGES = {"fda_vae": ("fda-vae", "synthesize"), "drdm": ("drdm", "augment"), "uni_coal": ("uni-coal", "synthesize"),
            "mgdcr": ("mgdcr", "reconstruct"), "meddiffusion3d": ("meddiffusion3d", "encode")}  # fmt: skip


@pytest.mark.parametrize("case", IMAGE_CASES)
@pytest.mark.parametrize("module", sorted(PACKAGES))
def test_bad_image(module, case, checkpoints, tmp_path, capsys):
    image = bad_image_files(tmp_path / "in")[case]
    out = tmp_path / "out"
    rc = importlib.import_module(f"{module}.cli").main(_argv(module, checkpoints[module], image, out))
    prog, verb = PACKAGES[module]
    name = image.name if module != "drdm" or image.is_dir() or image.exists() else "missing_folder"
    _check(capsys, rc, prog, verb, name, out)


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
@pytest.mark.parametrize("module", sorted(PACKAGES))
def test_bad_checkpoint(module, case, checkpoints, tmp_path, capsys):
    from medsynth_core.io import write_image

    ckpt = bad_checkpoint_files(tmp_path / "ck", checkpoints[module])[case]
    image = write_image(np.random.default_rng(0).random((16, 16, 2)).astype(np.float32), tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    rc = importlib.import_module(f"{module}.cli").main(_argv(module, ckpt, image, out))
    prog, verb = PACKAGES[module]
    _check(capsys, rc, prog, verb, ckpt.name, out)


# the train verbs: every bad config value exits 2 with one line naming the key, before any run folder exists.
# Keys differ per package until one vocabulary lands (issue 17): (prog, verb, run-root key, steps, batch, lr)
TRAIN = {
    "fda_vae": ("fda-vae", ["train"], "run.root", "train.steps", "train.batch_size", "train.lr_g"),
    "drdm": ("drdm", ["train"], "run.root", "train.steps", "train.batch_size", "train.lr"),
    "mgdcr": ("mgdcr", ["train"], "run.root", "train.steps", "train.batch_size", "train.lr"),
    "uni_coal": ("uni-coal", ["train"], "run.root", "train.steps", "train.batch_size", "optim.lr_g"),
    "meddiffusion3d": ("meddiffusion3d", ["train-ae", "--stage", "1"], "run.root", "ae.stage1.steps",
                       "ae.stage1.batch_size", "ae.stage1.lr"),
}  # fmt: skip
TRAIN_CASES = {  # case: (override builder, what the message must name)
    "unknown_key": (lambda s, b, lr: "train.nonsense=1", "train.nonsense"),
    "negative_steps": (lambda s, b, lr: f"{s}=-3", None),
    "zero_batch": (lambda s, b, lr: f"{b}=0", None),
    "negative_lr": (lambda s, b, lr: f"{lr}=-1", None),
    "nan_lr": (lambda s, b, lr: f"{lr}=.nan", None),
    "inf_lr": (lambda s, b, lr: f"{lr}=.inf", None),
    "text_steps": (lambda s, b, lr: f"{s}=abc", None),
    "folder_with_phantoms": (lambda s, b, lr: "data.root=/data/my_images", "data.root"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
@pytest.mark.parametrize("module", sorted(TRAIN))
def test_bad_train_config(module, case, tmp_path, capsys):
    prog, verb, root, steps, batch, lr = TRAIN[module]
    if module == "uni_coal" and case == "folder_with_phantoms":
        pytest.skip("uni-coal's data.root has a non-empty default (data/ixi_h5): a given folder is not told apart")
    build, names = TRAIN_CASES[case]
    override = build(steps, batch, lr)
    names = names or override.split("=")[0]
    out = tmp_path / "runs"
    cfg = REPO / "packages" / prog / "configs" / "demo.yaml"
    rc = importlib.import_module(f"{module}.cli").main([*verb, "--config", str(cfg), f"{root}={out}", override])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog} {verb[0]}: error: "), err
    assert names.split(".")[-1] in lines[0] and "Traceback" not in err, err
    assert not out.exists()

"""Every ``mgdcr`` command in the README's bash blocks runs as written (issue 14), in a folder holding phantom
files of the README's names and a micro prior as ``prior.pt``. Kept fast with the micro preset: the demo
commands get ``--config micro.yaml`` (so the second one's prior path names the micro run), and the prior is
trained 1 step with ``inverse.K=8`` to match the README's ``--K 8``. Optional ``[...]`` parts are left out."""

import glob
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from medsynth_core.io import MedicalImage, read_image, write_image
from medsynth_core.phantoms import cardiac_cine
from mgdcr.cli import main
from mgdcr.geometry import dhw_to_ijk_affine

PKG = Path(__file__).resolve().parents[1]
ROOT = PKG.parents[1]
MICRO = PKG / "configs" / "micro.yaml"
# commands that need what a test cannot have; each is covered elsewhere
NOT_RUN = {"torchrun": "needs the UK Biobank data and 4 GPUs (training runs in test_train.py)"}
REF = ROOT.parent / "shared" / "reference" / "mgdcr" / "official_tiny.pt"


class OfficialConf:
    """Stands in for the official ``TrainConfig`` pickled into Lightning's ``hyper_parameters``."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def readme_commands() -> list[list[str]]:
    text = (PKG / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).strip()
            if line:
                cmds.append(shlex.split(line))
    return cmds


def test_readme_lists_the_commands():
    cmds = readme_commands()
    verbs = [c[1] for c in cmds if c[0] == "mgdcr"]
    assert {"demo", "summary", "encode", "reconstruct", "evaluate", "convert-official"} <= set(verbs)
    assert all(c[0] in ("mgdcr", "uv", "torchrun") for c in cmds), cmds


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    root = tmp_path / "trainrun"
    args = ["train", "--config", str(MICRO), f"run.root={root}", "train.steps=1", "inverse.K=8"]
    assert main([*args, "train.sample_every=0"]) == 0
    shutil.copy(root / "mgdcr" / "micro" / "checkpoints" / "step_00000001.pt", tmp_path / "prior.pt")
    ph = cardiac_cine(n_frames=14, n_slices=3, size=16, seed=0)  # the README reconstructs frame 13
    write_image(
        MedicalImage.from_dhw(ph.sax.astype(np.float32), dhw_to_ijk_affine(ph.sax_affine)),
        tmp_path / "subj_sa.nii.gz",
    )
    for v, p in ph.lax.items():
        a, ijk = p.affine, np.eye(4)
        ijk[:3, 0], ijk[:3, 1], ijk[:3, 2], ijk[:3, 3] = a[:3, 1], a[:3, 0], a[:3, 2], a[:3, 3]
        write_image(
            MedicalImage.from_dhw(p.image[:, None].astype(np.float32), ijk), tmp_path / f"subj_{v}.nii.gz"
        )
    D = 8 * 2 + 1  # fork-style LAX volume and mask on the dense grid
    g = np.zeros((D, 16, 16), np.float32)
    g[:, 8] = 0.5
    for name, a in (("combine_1lax.nii.gz", g), ("combine_1lax_mask.nii.gz", (g > 0).astype(np.float32))):
        write_image(MedicalImage.from_dhw(a, np.eye(4)), tmp_path / name)
    if REF.is_file():  # the official tiny DiffAE as the README's official checkpoint
        import json

        import torch

        d = torch.load(REF, weights_only=True)["beatgans_autoenc_tiny"]
        ckpt = {
            "state_dict": {"ema_model." + k: v for k, v in d["state_dict"].items()},
            "hyper_parameters": {"conf": OfficialConf(**d["constructor"])},
            "global_step": 756789,
        }
        torch.save(ckpt, tmp_path / "epoch=438-step=756789.ckpt")
        torch.save({"state_dict": ckpt["state_dict"]}, tmp_path / "state_dict.pt")
        (tmp_path / "ctor.json").write_text(json.dumps(d["constructor"]))
    (tmp_path / "packages" / "mgdcr").mkdir(parents=True)
    (tmp_path / "packages" / "mgdcr" / "configs").symlink_to(PKG / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_readme_command_runs(workdir):
    ran = []
    for cmd in readme_commands():
        if cmd[0] != "mgdcr":
            assert cmd[0] in NOT_RUN or cmd[:2] == ["uv", "pip"], cmd
            continue
        verb, args = cmd[1], cmd[2:]
        if verb == "convert-official":
            if not REF.is_file():
                continue  # reference fixture absent: test_cli.py skips its conversion tests too
            args = ["converted.pt" if a == "prior.pt" else a for a in args]  # keep the micro prior.pt
            with pytest.warns(RuntimeWarning) if "--trust-pickle" in args else _nothing():
                assert main([verb, *args]) == 0, cmd
            ran.append(verb)
            continue
        if verb == "demo":  # micro preset: seconds instead of the recipe's minutes
            args = [
                a.replace("/toy/checkpoints/step_00001000.pt", "/micro/checkpoints/step_00000004.pt")
                for a in args
            ]
            args = [*args[:2], "--config", str(MICRO), *args[2:]]
        if verb == "evaluate":  # the dense ground truth on the reconstruction's grid
            final = read_image(glob.glob("recon/*_final_*.nii.gz")[0])
            write_image(
                final.with_array(np.clip(final.array * 0.9 + 0.05, 0, 1)), workdir / "dense_gt.nii.gz"
            )
        args = [m for a in args for m in (sorted(glob.glob(a)) if "*" in a else [a])]
        assert main([verb, *args]) == 0, cmd
        ran.append(verb)
    assert ran.count("convert-official") == (2 if REF.is_file() else 0)
    assert ran.count("reconstruct") == 3 and {"demo", "summary", "encode", "evaluate"} <= set(ran)
    assert (workdir / "recon" / "subj_sa_frame_13_z_linear_17slice.nii.gz").is_file()
    assert (workdir / "recon_fork" / "subj_sa_frame_13_final_17slice.nii.gz").is_file()
    assert (workdir / "heldout" / "subj_sa_frame_13_heldout.json").is_file()
    assert (workdir / "eval" / "metrics.json").is_file() and (workdir / "eval" / "metrics.csv").is_file()
    assert (workdir / "runs" / "demo" / "nolax" / "metrics.json").is_file()

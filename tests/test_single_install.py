"""One method installs on its own: wheels of medsynth-core and one package into a fresh venv."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = shutil.which("uv") or str(Path(sys.executable).parent / "uv")


@pytest.mark.slow
@pytest.mark.skipif(not Path(UV).exists() and shutil.which("uv") is None, reason="uv is not installed")
def test_core_and_one_method_install_alone(tmp_path):
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    for package in ("medsynth-core", "drdm"):
        subprocess.run([UV, "build", "--package", package, "--wheel", "--out-dir", str(dist)],
                       cwd=ROOT, check=True, capture_output=True, env=env, timeout=300)
    wheels = sorted(p.name for p in dist.glob("*.whl"))
    assert [w.split("-")[0] for w in wheels] == ["drdm", "medsynth_core"], wheels
    venv = tmp_path / "venv"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([UV, "venv", "--python", py, str(venv)], check=True, capture_output=True, env=env)
    proc = subprocess.run([UV, "pip", "install", "--python", str(venv / "bin" / "python"),
                           *[str(dist / w) for w in wheels]], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = subprocess.run([UV, "pip", "list", "--python", str(venv / "bin" / "python")],
                            capture_output=True, text=True, env=env).stdout
    for other in ("fda-vae", "mgdcr", "uni-coal", "meddiffusion3d"):
        assert other not in listed  # nothing else from the workspace came along
    out = subprocess.run([str(venv / "bin" / "drdm"), "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "augment" in out.stdout, out.stderr
    # the configs ship inside the wheel: the installed package finds and runs its own demo config
    find = "import drdm, medsynth_core.config as c; print(c.bundled_configs(drdm.__file__) / 'demo.yaml')"
    demo_cfg = subprocess.run([str(venv / "bin" / "python"), "-c", find], capture_output=True, text=True,
                              check=True).stdout.strip()
    assert "site-packages" in demo_cfg
    out = subprocess.run([str(venv / "bin" / "drdm"), "summary", "--json", "--config", demo_cfg], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)

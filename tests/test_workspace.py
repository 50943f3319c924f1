"""Every method package has the shared shape, imports, and answers ``--help`` with the contract verbs."""

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from workspace import discover_packages  # noqa: E402

EXPECTED = {"fda-vae": "fda_vae", "drdm": "drdm", "mgdcr": "mgdcr", "uni-coal": "uni_coal",
            "meddiffusion3d": "meddiffusion3d"}
CONTRACT_VERBS = ["train", "evaluate", "demo", "summary", "convert-official"]
METHOD_VERBS = {"fda-vae": ["synthesize", "prepare"], "drdm": ["augment"], "mgdcr": ["reconstruct"],
                "uni-coal": ["synthesize", "prepare"],
                "meddiffusion3d": ["train-ae", "encode", "decode", "generate", "train-controlnet", "restore"]}
PACKAGES = discover_packages()


def test_discovers_the_five_packages():
    assert {p.name: p.import_name for p in PACKAGES} == EXPECTED


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_package_layout(pkg):
    for rel in ("pyproject.toml", "README.md", "configs", f"src/{pkg.import_name}/__init__.py",
                f"src/{pkg.import_name}/cli.py", "tests"):
        assert (pkg.path / rel).exists(), f"{pkg.name} lacks {rel}"
    meta = tomllib.loads((pkg.path / "pyproject.toml").read_text())
    assert meta["project"]["version"] == "0.1.0"
    assert "medsynth-core" in meta["project"]["dependencies"]
    assert meta["tool"]["uv"]["sources"]["medsynth-core"] == {"workspace": True}
    assert meta["project"]["scripts"] == {pkg.name: f"{pkg.import_name}.cli:main"}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_imports_and_help(pkg):
    module = importlib.import_module(pkg.import_name)
    assert module.__version__ == "0.1.0"
    proc = subprocess.run([sys.executable, "-m", f"{pkg.import_name}.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for verb in CONTRACT_VERBS + METHOD_VERBS[pkg.name]:
        assert verb in proc.stdout, f"{pkg.name} --help does not list '{verb}'"
    script = Path(sys.executable).parent / pkg.name
    assert script.exists(), f"console script {pkg.name} is not installed in the environment"


def test_core_imports_every_module():
    for mod in ("atomic", "bench", "checkpoint", "cli", "config", "distributed", "io", "metrics",
                "phantoms", "training", "viz"):
        importlib.import_module(f"medsynth_core.{mod}")


_NO_TORCH_HELP = """
import sys
from {mod}.cli import main
for argv in (["--help"], ["train", "--help"], ["demo", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
heavy = sorted(m for m in ("torch", "monai", "SimpleITK", "nibabel") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
"""


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_help_imports_no_torch(pkg):
    # issue 17: `<pkg> --help` under 1 s, i.e. it must not import torch (which alone takes ~4 s cold)
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH_HELP.format(mod=pkg.import_name)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY=\n" in proc.stdout, f"{pkg.name} --help imports {proc.stdout.split('HEAVY=')[-1].strip()}"


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_config_by_bundled_name(pkg):
    """``--config demo`` / ``--config paper`` name the bundled YAMLs in every package (issue 17); an unknown
    name exits 2 with one line listing the bundled names."""
    run = [sys.executable, "-m", f"{pkg.import_name}.cli", "summary", "--config"]
    ok = subprocess.run([*run, "demo"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    # issue 17: human key: value lines by default, one JSON document with --json (the same facts)
    lines = ok.stdout.strip().splitlines()
    assert lines and all(": " in x for x in lines) and not ok.stdout.lstrip().startswith("{"), ok.stdout[:500]
    js = subprocess.run([sys.executable, "-m", f"{pkg.import_name}.cli", "summary", "--json", "--config", "demo"],
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert js.returncode == 0 and isinstance(json.loads(js.stdout), dict), js.stderr[-2000:]
    assert len(lines) >= len(json.loads(js.stdout))
    bad = subprocess.run([*run, "nope"], capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert "--config nope" in lines[0] and "demo" in lines[0] and "paper" in lines[0]


def _config_class(pkg):
    mod = importlib.import_module(f"{pkg.import_name}.config")
    return getattr(mod, "Config", None) or mod.DRDMConfig


# spellings the shared vocabulary replaced (issue 17): none may remain as a field of any section
OLD_SPELLINGS = {"batch", "batchsize", "max_steps", "image_every", "out_dir", "out_root", "run_root"}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_one_config_vocabulary(pkg):
    """Issue 17: every package's config has core's ``run`` section (name, root, seed, device, threads,
    keep_last, deterministic) and its training sections spell steps / batch_size / *_every the same way;
    every bundled YAML loads; the old spellings are refused with the new name."""
    import dataclasses

    from medsynth_core.config import ConfigError, RunSection, bundled_configs, load_config

    cls = _config_class(pkg)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    run_type = next(f.default_factory for f in dataclasses.fields(cls) if f.name == "run")
    assert issubclass(run_type, RunSection), f"{pkg.name}: run is {run_type}"
    top = {f.name for f in dataclasses.fields(cls)}
    assert not top & {"name", "seed", "device", "out_dir", "out_root", "run_root"}, top

    def sections(c, prefix=""):
        for f in dataclasses.fields(c):
            t = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if isinstance(t, type) and dataclasses.is_dataclass(t):
                yield f"{prefix}{f.name}", t
                yield from sections(t, f"{prefix}{f.name}.")
            elif t is not None and dataclasses.is_dataclass(obj := t()):
                yield f"{prefix}{f.name}", type(obj)
                yield from sections(type(obj), f"{prefix}{f.name}.")

    for name, sec in sections(cls):
        fields = {f.name for f in dataclasses.fields(sec)}
        assert not fields & OLD_SPELLINGS, f"{pkg.name}: {name} still spells {fields & OLD_SPELLINGS}"
        if name != "run":
            assert not fields & {"seed", "threads", "device", "keep_last", "deterministic"} or name in (
                "augment", "data"), f"{pkg.name}: {name} holds run keys {fields}"  # fmt: skip
    assert hints
    for yaml_path in sorted(bundled_configs(importlib.import_module(f"{pkg.import_name}.config").__file__).glob("*.yaml")):
        load_config(cls, yaml_path)  # every bundled YAML is in the vocabulary
    old = next(iter(cls.RENAMED))
    with pytest.raises(ConfigError, match=f"'{old}' is now '{cls.RENAMED[old]}'"):
        load_config(cls, None, [f"{old}=1"])
    # a checkpoint written before the rename (its config in the old spellings) still loads, unchanged
    from medsynth_core.config import _pop_dotted, _set_dotted, config_from_dict, config_to_dict

    demo = bundled_configs(importlib.import_module(f"{pkg.import_name}.config").__file__) / "demo.yaml"
    now = config_to_dict(load_config(cls, demo))
    before = config_to_dict(load_config(cls, demo))
    for old_key, new_key in cls.RENAMED.items():
        found, value = _pop_dotted(before, new_key)
        if found:
            _set_dotted(before, old_key, value)
    assert before != now and config_to_dict(config_from_dict(cls, before)) == now

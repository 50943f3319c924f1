from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from medsynth_core.config import (
    ConfigError,
    RunSection,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    require,
    save_config,
)


@dataclass
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.5, 0.999)

    def __post_init__(self):
        require(self.lr > 0, "lr", "must be > 0")


@dataclass
class Model:
    channels: tuple[int, ...] = (8, 16)
    latent: int = 4
    norm: Literal["group", "instance"] = "group"
    weights: Path | None = None


@dataclass
class Cfg:
    name: str = "run"
    model: Model = field(default_factory=Model)
    optim: Optim = field(default_factory=Optim)
    phases: list[str] = field(default_factory=lambda: ["a", "b"])
    amp: bool = False


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_defaults_file_and_overrides_layer(tmp_path):
    p = write(tmp_path, {"model": {"channels": [4, 8, 16]}, "optim": {"lr": "1e-3"}})
    cfg = load_config(Cfg, p, ["optim.lr=2e-4", "model.norm=instance", "amp=true", "phases=[x,y,z]"])
    assert cfg.model.channels == (4, 8, 16)
    assert cfg.model.latent == 4
    assert cfg.optim.lr == pytest.approx(2e-4)  # "2e-4" parsed by YAML as str, coerced to float
    assert cfg.optim.betas == (0.5, 0.999)
    assert cfg.model.norm == "instance" and cfg.amp is True and cfg.phases == ["x", "y", "z"]


def test_yaml_string_exponent_is_coerced(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, {"optim": {"lr": "1e-3"}}))
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-3


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    p = write(tmp_path, {"model": {"chanels": [4]}})
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, p)
    msg = str(err.value)
    assert str(p) in msg and "model.chanels" in msg and "did you mean 'channels'" in msg
    assert "latent" in msg  # lists the valid keys


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="unknown key 'optim.learning_rate'"):
        load_config(Cfg, None, ["optim.learning_rate=1"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.latent=abc", "expects an integer"),
        ("model.latent=1.5", "expects an integer"),
        ("model.norm=batch", "must be one of ['group', 'instance']"),
        ("optim.betas=[0.1]", "list of 2 values"),
        ("amp=maybe", "true/false"),
        ("optim.lr=-1", "'lr' must be > 0"),
        ("model=3", "mapping"),
        ("optim.lr=.nan", "'optim.lr' expects a finite number"),  # NaN passes `lr > 0`-style checks as False
        ("optim.lr=.inf", "'optim.lr' expects a finite number"),  # and Inf passes them as True
        ("optim.betas=[0.5,.inf]", "finite number"),
    ],
)
def test_bad_values_are_reported(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(Cfg, None, [override])
    assert fragment in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- at top\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Cfg, bad)


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Cfg, None, ["model.weights=/x/w.pth", "model.channels=[2,4]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    again = load_config(Cfg, path)
    assert again == cfg
    assert config_to_dict(again)["model"]["weights"] == "/x/w.pth"
    assert config_from_dict(Cfg, config_to_dict(cfg)) == cfg


def test_parse_overrides_nesting():
    assert parse_overrides(["a.b.c=1", "a.d=[1, 2]", "e=x"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x"}


def test_bundled_configs_wheel_and_checkout_layouts(tmp_path):
    from medsynth_core.config import bundled_configs

    checkout = tmp_path / "packages" / "pkg"
    (checkout / "src" / "pkg").mkdir(parents=True)
    (checkout / "configs").mkdir()
    assert bundled_configs(checkout / "src" / "pkg" / "demo.py") == checkout / "configs"
    wheel = tmp_path / "site-packages" / "pkg"
    (wheel / "configs").mkdir(parents=True)
    assert bundled_configs(wheel / "demo.py") == wheel / "configs"
    with pytest.raises(ConfigError, match="no configs folder"):
        bundled_configs(tmp_path / "a" / "b" / "c" / "x.py")


@dataclass
class PhantomData:
    source: Literal["phantom", "folder"] = "phantom"
    root: str = ""


@dataclass
class SyntheticData:
    synthetic: bool = True
    root: str | None = None


@dataclass
class DefaultRootData:  # a root with a non-empty default cannot tell a user's folder from the default
    source: Literal["phantom", "h5"] = "phantom"
    root: str = "data/h5"


@dataclass
class DataCfg:
    data: PhantomData = field(default_factory=PhantomData)
    syn: SyntheticData = field(default_factory=SyntheticData)
    other: DefaultRootData = field(default_factory=DefaultRootData)


def test_folder_given_to_a_phantom_source_is_refused():
    """Issue 18: `data.root=/my/images` on a demo config (source: phantom) trained on phantoms silently."""
    with pytest.raises(ConfigError, match=r"'data.root' is set \(/x\) but 'data.source' is phantom.*data.source=folder"):
        load_config(DataCfg, None, ["data.root=/x"])
    with pytest.raises(ConfigError, match="'syn.synthetic' is true.*syn.synthetic=false"):
        load_config(DataCfg, None, ["syn.root=/x"])
    ok = load_config(DataCfg, None, ["data.root=/x", "data.source=folder", "syn.root=/x", "syn.synthetic=false"])
    assert (ok.data.source, ok.data.root, ok.syn.synthetic) == ("folder", "/x", False)
    assert load_config(DataCfg, None, ["other.root=/x"]).other.root == "/x"  # default non-empty: not judged
    assert load_config(DataCfg, None, []).data.root == ""


def test_config_file_resolves_bundled_names(tmp_path):
    from medsynth_core.config import ConfigError, config_file

    pkg = tmp_path / "pkg"
    (pkg / "configs").mkdir(parents=True)
    (pkg / "configs" / "demo.yaml").write_text("a: 1\n")
    (pkg / "configs" / "paper.yaml").write_text("a: 2\n")
    module = pkg / "cli.py"
    assert config_file("demo", module) == pkg / "configs" / "demo.yaml"
    assert config_file("some/where.yaml", module) == "some/where.yaml"  # paths unchanged
    assert config_file(None, module) is None
    with pytest.raises(ConfigError, match=r"--config nope: .*bundled: demo, paper"):
        config_file("nope", module)


@dataclass
class Train:
    steps: int = 10
    batch_size: int = 2


@dataclass
class Run(RunSection):  # a package's defaults: a subclass (a section given in part starts from the class defaults)
    name: str = "x"


@dataclass
class Renamed:
    RENAMED = {"out_dir": "run.root", "train.batchsize": "train.batch_size", "train.seed": "run.seed"}
    run: Run = field(default_factory=Run)
    train: Train = field(default_factory=Train)


def test_old_spellings_are_refused_from_files_and_moved_from_checkpoints(tmp_path):
    """Issue 17: one vocabulary. A YAML or override with a replaced spelling exits with the new name; a
    config stored in an older checkpoint (config_from_dict) loads with its values moved."""
    from medsynth_core.config import TRAIN_KEYS

    path = write(tmp_path, {"out_dir": "elsewhere", "train": {"batchsize": 4}})
    with pytest.raises(ConfigError) as exc:
        load_config(Renamed, path)
    msg = str(exc.value)
    assert "'out_dir' is now 'run.root'" in msg and "'train.batchsize' is now 'train.batch_size'" in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match="'train.seed' is now 'run.seed'"):
        load_config(Renamed, None, ["train.seed=3"])
    old = {"out_dir": "elsewhere", "train": {"batchsize": 4, "seed": 7, "steps": 5}}
    cfg = config_from_dict(Renamed, old)
    assert (cfg.run.root, cfg.run.seed, cfg.run.name, cfg.train.batch_size, cfg.train.steps) == ("elsewhere", 7, "x", 4, 5)
    assert old["train"]["batchsize"] == 4  # the caller's mapping is not changed
    new_wins = config_from_dict(Renamed, {"out_dir": "old", "run": {"root": "new"}})
    assert new_wins.run.root == "new"
    assert load_config(Renamed, None, ["run.root=r", "train.batch_size=3"]).train.batch_size == 3
    with pytest.raises(ConfigError, match="keep_last"):
        config_from_dict(RunSection, {"keep_last": 0})
    assert {"steps", "batch_size", "lr"} <= set(TRAIN_KEYS)

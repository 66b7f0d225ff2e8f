import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.config import Config, ConfigError, dump_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("override, named", [
    (["model.nmae=resnet18"], "model.nmae"),
    (["optim.lr=fast"], "optim.lr"),
    (["optim.name=lamb"], "optim.name"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=.nan"], "optim.lr"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.lr=.inf"], "optim.lr"),
    (["schedule.gamma=-.inf"], "schedule.gamma"),
    (["objective.byot.alpha=1.5"], "objective.byot.alpha"),
    (["exits.stages=[1,4]"], "exits.stages"),
    (["data.batch_size=true"], "data.batch_size"),
    (["precision.amp=fp8"], "precision.amp"),
    (["bogus=1"], "bogus"),
])
def test_bad_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert named in str(e.value)


def test_literal_error_lists_allowed_values():
    with pytest.raises(ConfigError, match="'sgd', 'adamw'"):
        load_config(None, ["optim.name=lamb"])


def test_overrides_and_types():
    cfg = load_config(None, ["optim.lr=0.05", "exits.stages=[2,3]", "objective.byot.kd=soft_ce",
                             "model.depths=[1,1,1,1]", "objective.byot.hint_exits=null"])
    assert cfg.optim.lr == 0.05 and cfg.exits.stages == [2, 3] and cfg.objective.byot.kd == "soft_ce"
    assert cfg.model.depths == [1, 1, 1, 1] and cfg.objective.byot.hint_exits is None
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)  # int accepted where float expected


def test_yaml_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["optim.lr=0.3"])
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(p) == cfg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="objective.byot.kd_weights"):
        load_config(None, ["objective.byot.kd_weights=[0.1]"])  # 3 shallow exits by default
    with pytest.raises(ConfigError, match="objective.byot.hint_exits"):
        load_config(None, ["objective.byot.hint_exits=[3]"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_print_config_cli(capsys):
    assert main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "optim.lr=0.2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.2 and printed["model"]["num_classes"] == 10


def test_unknown_key_cli_exits_nonzero():
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
                        "optim.lrr=0.1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "optim.lrr" in r.stderr

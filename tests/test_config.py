import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.config import Config, ConfigError, dump_yaml, load_config, to_dict, validate
from engine.objectives import OBJECTIVES

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
    (["exits.stages=[0,3]"], "exits.stages"),
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
    cfg = load_config(None, ["optim.lr=0.05", "exits.stages=[1,2]", "objective.byot.kd=soft_ce",
                             "model.depths=[1,1,1,1]", "objective.byot.hint_exits=null"])
    assert cfg.optim.lr == 0.05 and cfg.exits.stages == [1, 2] and cfg.objective.byot.kd == "soft_ce"
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
    with pytest.raises(ConfigError, match="sd_generation"):
        load_config(None, ["objective.name=byot", "generations=2"])


@pytest.mark.parametrize("stages", ["[3]", "[-1]", "[0,0]"])
def test_exit_stages_are_0_based_and_the_error_names_the_allowed_values(stages):
    with pytest.raises(ConfigError, match=r"exits.stages: .*(allowed values: 0, 1, 2|duplicates)"):
        load_config(None, [f"exits.stages={stages}"])
    assert load_config(None, []).exits.stages == [0, 1, 2]  # BYOT's exits after the first three of four stages


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_validate_leaves_the_config_unchanged(path):
    """Every objective and label-smoothing convention on every shipped config: what validate accepts, it keeps."""
    for name in OBJECTIVES.names():
        for convention in ("wrong_classes", "all_classes"):
            cfg = load_config(path)
            cfg.objective.name, cfg.objective.label_smoothing.convention = name, convention
            before = copy.deepcopy(cfg)
            try:
                validate(cfg)
            except ConfigError:
                continue
            assert cfg == before, (name, convention)


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


def test_objective_requirement_cli_exits_2_naming_the_key():
    r = subprocess.run([sys.executable, "-m", "engine.cli", "train", "--config", str(ROOT / "configs" / "demo.yaml"),
                        "objective.name=cskd", "--print-config"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "data.sampler=class_pair" in r.stderr and not r.stdout


def test_cli_can_be_discovered(capsys, monkeypatch):
    """--version, --list-models, `bench --help` and `profile --help` answer with exit 0; an unknown model name
    stops at --print-config with one line that lists the registered ones."""
    from engine.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("selfdistill ")
    assert main(["train", "--list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"resnet18", "resnet50", "cskd_preact_resnet18", "timm:resnet18", "timm:vit_tiny_patch16_224"} <= set(names)

    def no_timm():
        raise ImportError("No module named 'timm'")
    monkeypatch.setattr("engine.models.timm_backbone.import_timm", no_timm)
    assert main(["train", "--list-models"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out.split() and "timm:<name>  (any timm model with forward_intermediates" in out
    for command, subs in (("bench", ("kernels", "loader", "train")), ("profile", ("exits",))):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(f"  {s} " in out for s in subs), out
        assert main([command]) == 2  # no subcommand: usage on stderr, exit 2
        assert "usage" in capsys.readouterr().err
    assert main(["train", "--help-config"]) == 0
    keys = capsys.readouterr().out.splitlines()
    assert "objective.backend = 'auto'  # auto = Triton on CUDA, PyTorch on CPU" in keys
    assert any(k.startswith("data.val_split = 0  # (ge 0); images carved from train") for k in keys)
    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    from engine.config import to_dict
    assert {k.split(" = ")[0] for k in keys} == set(leaves(to_dict(load_config(None, []))))  # every key, once
    assert main(["models", "resnet*"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert {"resnet18", "resnet34", "resnet50", "resnet101"} <= set(listed) and "preact_resnet18" not in listed
    assert main(["train", "--help-config", "optim"]) == 0
    optim_keys = capsys.readouterr().out.splitlines()
    assert optim_keys and all(k.startswith("optim.") for k in optim_keys)
    assert main(["train", "model.name=resnet19", "--print-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.name: 'resnet19' is not a registered model" in err[0] and "resnet18" in err[0]


def test_a_retired_key_in_an_old_checkpoint_config_still_loads():
    """checkpoint.keep_last did nothing and is gone: configs saved in older checkpoints name it and must load; on
    the command line it is refused with the reason."""
    from engine.config import config_from_dict

    old = to_dict(load_config(None, ["seed=3"]))
    old["checkpoint"]["keep_last"] = True
    assert config_from_dict(old).seed == 3
    with pytest.raises(ConfigError, match="checkpoint.keep_last: this key was removed"):
        load_config(None, ["checkpoint.keep_last=false"])


def test_a_closed_pipe_ends_a_listing_quietly():
    """`selfdistill models | head -1`: the reader leaves early; no BrokenPipeError traceback, exit 141 as cat."""
    import fcntl
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "engine.cli", "models"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, bufsize=1)
    fcntl.fcntl(p.stdout.fileno(), 1031, 4096)  # F_SETPIPE_SZ: the listing (timm's names) no longer fits the pipe
    assert p.stdout.readline().strip()
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_moved_key_names_its_new_place_and_old_checkpoints_migrate(tmp_path):
    """objective.mixup_alpha became objective.mixup.alpha: a YAML file or command line with the old key is refused
    with the new one; a config saved in an older checkpoint loads with the value at its new place. Every refusal,
    a retired key's too, names where the key came from."""
    from engine.config import config_from_dict

    with pytest.raises(ConfigError, match=r"objective.mixup_alpha \(the command line\) is now objective.mixup.alpha"):
        load_config(None, ["objective.mixup_alpha=1.0"])
    old = tmp_path / "old.yaml"
    old.write_text("objective:\n  name: max_entropy\n  max_entropy_beta: 0.3\n")
    with pytest.raises(ConfigError, match=r"max_entropy_beta \(.*old.yaml\) is now objective.max_entropy.beta"):
        load_config(old)
    old.write_text("checkpoint:\n  keep_last: true\n")
    with pytest.raises(ConfigError, match=r"checkpoint.keep_last: this key was removed .*drop it from .*old.yaml$"):
        load_config(old)
    saved = to_dict(load_config(None, ["objective.name=mixup", "objective.mixup.alpha=0.4"]))
    saved["objective"]["mixup_alpha"] = saved["objective"].pop("mixup")["alpha"]  # as an older checkpoint holds it
    assert config_from_dict(saved).objective.mixup.alpha == 0.4

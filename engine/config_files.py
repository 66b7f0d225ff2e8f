"""Config files: the YAML a config starts from (with `base:` chains) and the shipped recipes found by name."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.config_errors import ConfigError

# The recipes of configs/: beside the packages in a clone or an editable install, inside engine/ in a wheel.
RECIPE_DIRS = (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parent / "recipes")


def shipped_configs() -> list[str]:
    return sorted({p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def find_config(path: str | Path) -> Path:
    """A file path as given; else a bare name (`demo`, `imagenet_resnet50_byot.yaml`) of a shipped recipe."""
    path = Path(path)
    if path.is_file() or path.parent != Path("."):
        return path
    for d in RECIPE_DIRS:
        for name in (path.name, f"{path.name}.yaml"):
            if (d / name).is_file():
                return d / name
    raise ConfigError(f"config file not found: {path} (nor a shipped recipe: {', '.join(shipped_configs())})")


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping, with the file its `base:` names (relative to it) underneath."""
    if path.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"{path}: `base:` files form a cycle: {names}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
        data = _deep_update(read_yaml(path.parent / base, (*chain, path.resolve())), data)
    return data


# Keys that moved (old dotted key -> new) and keys that did nothing and were removed. A checkpoint saved before
# keeps them in its config, and still loads and resumes (`migrate`); a YAML file or a command line naming one is
# refused with the new key (`refuse_old_key`).
MOVED = {"objective.max_entropy_beta": "objective.max_entropy.beta", "objective.mixup_alpha": "objective.mixup.alpha"}
RETIRED = {"checkpoint.keep_last"}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 0.1}} -> {'optim.lr': 0.1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def refuse_old_key(key: str, where: str) -> None:
    if key in MOVED:
        raise ConfigError(f"{key} ({where}) is now {MOVED[key]}")
    if key in RETIRED:
        raise ConfigError(f"{key}: this key was removed (it had no effect); drop it from {where}")


def migrate(data: dict) -> dict:
    """A saved config with moved keys at their new place and retired ones dropped (in place)."""
    for key in [*MOVED, *RETIRED]:
        section, _, name = key.rpartition(".")
        node = data
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and name in node:
            value = node.pop(name)
            if key in MOVED:
                *path, last = MOVED[key].split(".")
                target = data
                for part in path:
                    target = target.setdefault(part, {})
                target.setdefault(last, value)
    return data


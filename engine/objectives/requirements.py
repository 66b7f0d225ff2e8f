"""What an objective needs from the rest of the config, declared as data on its class (`Objective.requires`).

`base.check_config` asks the objective named by `objective.name` for its requirements and stops with a
`ConfigError` naming the key at the first one the config does not meet, before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional


def _get(cfg, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _show(value: Any) -> str:
    """A value as it is written in a YAML config or a key=value override."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Requirement:
    """Config key `key` must equal `value` (op "=="), be given (op "set": not null), be greater than `value`
    (op ">") or hold at least `value` items (op "min_items"); with `when` = (other key, value), only when that key
    has that value. `note` says why, or what to do instead, at the end of the error message."""

    key: str
    op: Literal["==", "set", ">", "min_items"]
    value: Any = None
    when: Optional[tuple[str, Any]] = None
    note: str = ""

    def applies(self, cfg) -> bool:
        return self.when is None or _get(cfg, self.when[0]) == self.when[1]

    def holds(self, cfg) -> bool:
        got = _get(cfg, self.key)
        if self.op == "==":
            return got == self.value
        if self.op == "set":
            return got is not None and got != ""
        if self.op == ">":
            return got > self.value
        return len(got) >= self.value

    def message(self, objective: str) -> str:
        who = f"objective.name={objective!r}"
        if self.when is not None:
            who += f" with {self.when[0]}={_show(self.when[1])}"
        need = {"==": f"{self.key}={_show(self.value)}", "set": self.key, ">": f"{self.key} > {_show(self.value)}",
                "min_items": f"at least {self.value} value(s) in {self.key}"}[self.op]
        return f"{who} needs {need}" + (f" ({self.note})" if self.note else "")

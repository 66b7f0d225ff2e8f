"""`selfdistill train --help-config`: every config key with its default, range and description, read from the
dataclasses of engine/config.py."""
from __future__ import annotations

import dataclasses

from engine.config import Config


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per key: dotted name, default, range and description (`selfdistill train --help-config`)."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            lines += describe(type(default), f"{prefix}{f.name}.")
            continue
        meta = f.metadata
        bounds = ", ".join(f"{k} {meta[k]}" for k in ("ge", "gt", "le") if meta.get(k) is not None)
        doc = "; ".join(x for x in (bounds and f"({bounds})", meta.get("doc", "")) if x)
        lines.append(f"{prefix}{f.name} = {default!r}" + (f"  # {doc}" if doc else ""))
    return lines

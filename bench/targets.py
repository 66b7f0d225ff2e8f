"""The performance targets of the bench reports (bench/README.md lists them): a verdict per target."""
from __future__ import annotations

from typing import Any, Optional

import torch


def target(name: str, value: Optional[float], met: bool, device: torch.device) -> dict[str, Any]:
    """One of the performance targets: judged on a GPU only, and only from a value this run measured."""
    status = ("not evaluated: CPU run (the targets are for one GPU; nothing is extrapolated)"
              if device.type != "cuda" else "not measured in this run" if value is None else "pass" if met else "fail")
    return {"target": name, "value": value, "status": status}


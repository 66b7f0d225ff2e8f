"""Triton kernels, one package per op, and the offline tools that check them without a GPU.

    kernels.multi_exit   the fused multi-exit CE / KD / hint loss: op, forward and backward kernels, shared tiles,
                         options, and the independent float64 reference (tests, bench)
    kernels.aot          compile every launched kernel for sm_90 without a GPU: registers, spills, SASS and MUFU per
                         logit element, and the issue / MUFU / DRAM time model

The package imports nothing from the rest of the project. Importing it does not import triton; the submodules do.
`choose_interpreter()` is the one place that decides, before triton loads, whether the kernels run compiled (CUDA)
or in Triton's interpreter (CPU): the bench entry points and tests/conftest.py call it first. `selfdistill train`
does not: on CPU it runs objective.backend=triton only when the environment already sets TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
import sys


def choose_interpreter(cuda_available: bool) -> bool:
    """Select Triton's interpreter where there is no GPU, unless the environment already says (TRITON_INTERPRET),
    and only while no kernel is decorated yet: `triton.jit` reads the variable when it decorates. Returns whether
    the kernels will run in the interpreter."""
    decorated = any(name.startswith("kernels.multi_exit.") for name in sys.modules)
    if "TRITON_INTERPRET" not in os.environ and not cuda_available and not decorated:
        os.environ["TRITON_INTERPRET"] = "1"
    return os.environ.get("TRITON_INTERPRET") == "1"

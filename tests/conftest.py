"""Test-session environment, set before any test module imports triton."""
import os

import torch

# With no GPU the Triton kernels run under the interpreter, which is chosen when a kernel is decorated: set it first.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

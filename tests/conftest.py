"""Test-session environment, set before any test module imports triton."""
import os

import pytest
import torch

# With no GPU the Triton kernels run under the interpreter, which is chosen when a kernel is decorated: set it first.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny CPU models: on a small shared box, spinning OpenMP workers made such steps
    10-100x slower. Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

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


def pytest_report_header(config):
    """The vector ISA the CPU kernels use: the suite runs twice in `make test`, the second time narrowed to AVX2."""
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return f"cpu capability: {torch.backends.cpu.get_cpu_capability()} (env: {env or 'default'}), " \
           f"threads: {torch.get_num_threads()}"

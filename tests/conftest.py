"""Test-session environment, set before any test module imports triton."""
import getpass
import os
import tempfile

import pytest
import torch

from kernels import choose_interpreter

# Inductor's cache keys do not include the vector ISA chosen through ATEN_CPU_CAPABILITY: a wrapper generated for
# AVX2 (8-float steps) reused under AVX-512 stores 16 floats per step and overruns its buffers (heap corruption,
# seen here). So a narrowed pass compiles into a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-{getpass.getuser()}-{os.environ['ATEN_CPU_CAPABILITY']}")

# With no GPU the Triton kernels run under the interpreter, which is chosen when a kernel is decorated: set it first.
choose_interpreter(torch.cuda.is_available())


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

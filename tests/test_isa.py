"""The narrowed-ISA pass of `make test` really runs narrowed: ATen's kernels, oneDNN's and inductor's generated C++
all follow ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, so the numerics tests see what a CPU without AVX-512 computes."""
from __future__ import annotations

import os

import pytest
import torch
from torch._inductor import cpu_vec_isa


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") != "avx2", reason="the default-ISA pass: nothing narrowed")
def test_avx2_settings_reach_aten_and_inductor():
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    isa = cpu_vec_isa.pick_vec_isa()  # inductor reads ATEN_CPU_CAPABILITY when cpp.simdlen is unset
    assert str(isa) == "avx2" and isa.bit_width() == 256
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2"
    # inductor's cache does not key on the ISA: the narrowed pass has its own (tests/conftest.py)
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    assert cache_dir().endswith("-avx2")


def test_default_capability_is_the_widest_the_cpu_has():
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        pytest.skip("narrowed by the environment")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = "AVX512" if " avx512bw " in flags and " avx512vl " in flags else "AVX2" if " avx2 " in flags else None
    if expected is None:
        pytest.skip("not an x86 CPU with AVX2")
    assert torch.backends.cpu.get_cpu_capability() == expected

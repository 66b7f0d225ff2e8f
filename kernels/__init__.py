"""Fused Triton loss kernels (CUDA; CPU only under TRITON_INTERPRET=1) and their PyTorch reference.

    kernels.options           LossOptions: the frozen options of the op, its fake, its backward and the reference
    kernels.multi_exit_loss   the fused multi-exit CE / KD / hint op: fused_loss(), multi_exit_loss(), MultiExitLoss
    kernels.multi_exit_fwd    the forward @triton.jit kernel (one launch), the design of the op in its docstring
    kernels.multi_exit_bwd    the backward kernel (one launch)
    kernels.multi_exit_tiles  the tiles, loads, per-lane online softmax and exponentials both kernels share
    kernels.reference         multi_exit_loss_reference(): the float64/fp32 PyTorch reference (tests, bench)
    kernels.aot_check         compile every launched kernel for sm_90 without a GPU; registers, spills, SASS and MUFU
                              per logit element, and the issue / MUFU / DRAM time model (kernels.aot_sass parses SASS)

The package imports nothing from the rest of the project. Importing it does not import triton; the submodules do.
"""

"""Fused Triton loss kernels (CUDA; CPU only under TRITON_INTERPRET=1) and their PyTorch reference.

    kernels.multi_exit_loss   the fused multi-exit CE / KD / hint op: multi_exit_loss(), MultiExitLoss
    kernels.reference         multi_exit_loss_reference(): the float64/fp32 PyTorch reference (tests, bench)
    kernels.objective_bridge  byot_terms_triton() and the CE / KD / soft-target term builders of the objectives
    kernels.aot_check         compile every kernel variant for a GPU target without a GPU

Importing this package does not import triton; the submodules do.
"""

"""The fused multi-exit loss: CE at every exit, KD from the deepest (or a teacher), and feature hints, in one
forward and one backward launch.

    op         fused_loss(), multi_exit_loss(), MultiExitLoss: plans, launches, autograd.Function, torch.library op
    forward    the forward @triton.jit kernel (one launch); the design of the op in its docstring
    backward   the backward kernel (one launch)
    tiles      the tiles, loads, per-lane online softmax and exponentials both kernels share
    options    LossOptions: the frozen options of the op, its fake, its backward and the reference
    reference  multi_exit_loss_reference(): the float64/fp32 PyTorch reference (tests, bench)
"""

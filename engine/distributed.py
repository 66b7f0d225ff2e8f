"""torch.distributed set-up from the torchrun environment: NCCL on GPU, gloo on CPU."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

_TIMEOUT_S: list[float] = []  # the process group's collective timeout, once one is set up


class CollectiveTimeout(RuntimeError):
    """A collective gave up on a rank that stopped answering (hung, frozen or dead)."""


def as_collective_timeout(e: BaseException) -> CollectiveTimeout | None:
    """The backend's timeout error (gloo: "Timed out waiting ...ms", NCCL's watchdog: "... timeout") as one clear
    error naming `distributed.timeout_s`; None for anything else."""
    text = str(e)
    if not _TIMEOUT_S or not isinstance(e, RuntimeError) or not ("Timed out" in text or "timeout" in text.lower()):
        return None
    first = text.strip().splitlines()[-1] if text.strip() else type(e).__name__
    return CollectiveTimeout(f"a rank did not answer within distributed.timeout_s={_TIMEOUT_S[0]:g} s (hung, "
                             f"stopped or dead); last.pt holds the last saved state, so --resume auto once every rank "
                             f"runs again ({first})")


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(backend: str = "auto", device: str | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Reads RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); a plain `python` run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if use_cuda else None,
                                timeout=datetime.timedelta(seconds=timeout_s))
        _TIMEOUT_S[:] = [timeout_s]
    return DistInfo(rank, world, local_rank, dev)


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused: bool) -> nn.Module:
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Every rank takes rank 0's buffers (BatchNorm's running statistics). Each rank's last training forward
    updated its own, so without this the ranks would evaluate with different statistics, and a run resumed from
    rank 0's last.pt would evaluate differently from the run it continues. DDP broadcasts rank 0's buffers at the
    next training forward anyway, so training is unchanged."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b.data, 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate tensors of different lengths from every rank (evaluation shards are unpadded)."""
    if not info.enabled:
        return t
    parts: list = [None] * info.world
    dist.all_gather_object(parts, t.cpu())
    return torch.cat(parts).to(t.device)


def all_gather_object(obj, info: DistInfo) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not info.enabled:
        return [obj]
    parts: list = [None] * info.world
    dist.all_gather_object(parts, obj)
    return parts


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

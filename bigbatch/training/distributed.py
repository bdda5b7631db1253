"""Process-group setup for ``python train.py`` (one process) and ``torchrun`` (env://).

The launcher (``bigbatch.launcher``) detects ranks and rendezvous; a lone process gets a private
loopback rendezvous on a free port, so DeepSpeed never goes looking for MPI. NCCL when CUDA is
present, gloo otherwise. Small collectives the loop needs live here too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(threads: int | None = None) -> DistInfo:
    """Initialise torch.distributed and DeepSpeed's comm layer (idempotent) from whatever launched
    us (torchrun, SLURM, MPI, the deepspeed launcher, or nothing), as ``bigbatch.launcher``
    detects it; set CPU threads per process (``threads`` or cores / processes on this node)."""
    from bigbatch.launcher.distributed import default_backend
    from bigbatch.launcher.distributed import init_distributed as launcher_init

    backend = default_backend()
    topo = launcher_init(backend=backend, use_deepspeed=True)
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // topo.local_world_size))
    return DistInfo(topo.rank, topo.world_size, topo.local_rank, topo.local_world_size, device, backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few floats over ranks (one fp64 all-reduce)."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is true on any rank (used so all ranks stop at the same step)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

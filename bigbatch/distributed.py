"""Process-group plumbing: start the group from the detected topology, and the small collectives
bigbatch needs (a few floats summed, averaged or maxed; a flag set on any rank; a barrier).

``init_distributed`` works under every launcher ``bigbatch.launcher`` detects (torchrun, the
``deepspeed`` launcher, SLURM, MPI, mpi4py) and for a lone process, which gets a world-size-1 group
on a private loopback port so that DeepSpeed never goes looking for MPI. NCCL when CUDA is present,
gloo otherwise. Every collective here puts its tensor where the backend wants it (NCCL: the current
CUDA device; gloo: CPU).
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigbatch.launcher.env import detect_topology, export_env

DEFAULT_TIMEOUT_S = 600.0


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def deepspeed_without_shm() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op from loading.

    On the CPU accelerator ``deepspeed.comm`` builds and initialises it in every process, and each
    process creates a ~69 MB ``/dev/shm/deepspeed_allreduce_buffer_*`` file that is never removed
    (DeepSpeed 0.19.8): measured here, a day of test launches left 244 of them, 16 GB of a 24 GB
    machine's memory, until processes died of memory exhaustion. The op serves only
    ``inference_all_reduce``; training collectives go through torch.distributed either way.
    """
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False
    except Exception:  # another DeepSpeed layout: nothing to switch off
        pass


def init_distributed(topology=None, *, backend: str | None = None, use_deepspeed: bool = False,
                     timeout_s: float = DEFAULT_TIMEOUT_S):
    """Detect (unless given) the :class:`~bigbatch.launcher.env.Topology`, export its ``env://``
    variables and initialise the default process group with them; returns the topology.

    A no-op for the group if one already exists. ``backend``: None picks :func:`default_backend`.
    ``use_deepspeed``: initialise through ``deepspeed.init_distributed`` (its MPI discovery off:
    the topology is already known) so that DeepSpeed's comm layer and torch's share one group.
    ``timeout_s``: how long a collective may wait for the other ranks before it fails. On CUDA,
    selects device ``local_rank`` first.
    """

    topo = detect_topology() if topology is None else topology
    export_env(topo)
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(topo.local_rank % torch.cuda.device_count())
    timeout = _dt.timedelta(seconds=timeout_s)
    if use_deepspeed:
        import deepspeed

        deepspeed_without_shm()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                   init_method="env://", verbose=False)
    elif not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=topo.rank,
                                world_size=topo.world_size, timeout=timeout)
    if dist.get_world_size() != topo.world_size or dist.get_rank() != topo.rank:
        raise RuntimeError(
            f"process group has rank {dist.get_rank()} of {dist.get_world_size()} but the "
            f"environment ({topo.source}) says rank {topo.rank} of {topo.world_size}")
    os.environ.setdefault("BIGBATCH_LAUNCH_SOURCE", topo.source)
    return topo


@dataclass(frozen=True)
class DistInfo:
    """Where a training process runs: its ranks, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_training_process(threads: int | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """:func:`init_distributed` for a training worker (DeepSpeed's comm layer included), and its
    device; on CPU, torch's intra-op threads are ``threads`` or this node's cores / processes."""
    backend = default_backend()
    topo = init_distributed(backend=backend, use_deepspeed=True, timeout_s=timeout_s)
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // topo.local_world_size))
    return DistInfo(topo.rank, topo.world_size, topo.local_rank, topo.local_world_size, device, backend)


_LONG_WAIT = {}


def long_wait_group(hours: float = 24.0):
    """A gloo group of every rank whose collectives wait up to ``hours``: for the waits that take as
    long as one rank's work (building a data cache), where the default group's timeout (meant to
    catch a hung rank within minutes) would fire. Created on first use (collective)."""
    if not is_initialized() or dist.get_world_size() == 1:
        return None
    if "group" not in _LONG_WAIT:
        _LONG_WAIT["group"] = dist.new_group(backend="gloo", timeout=_dt.timedelta(hours=hours))
    return _LONG_WAIT["group"]


def _collective_device(group=None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_floats(values: list[float], op: str = "sum", group=None) -> list[float]:
    """``values`` reduced over the ranks of ``group`` with ``op`` (sum, mean, max, min) in one
    float64 all-reduce; the values themselves without a process group."""
    if op not in _OPS:
        raise ValueError(f"op: {op!r} is not one of {sorted(_OPS)}")
    if not is_initialized() or dist.get_world_size(group) == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(t, op=_OPS[op], group=group)
    out = t.cpu().tolist()
    if op == "mean":
        out = [v / dist.get_world_size(group) for v in out]
    return out


def agree(error: str | None, group=None) -> list[str]:
    """Every rank's error (``"rank R: ..."``) after a step that may have failed on some of them, so
    that all ranks go on or stop together; empty when it worked everywhere. Collective (over
    ``group``, default: every rank)."""
    if not is_initialized() or dist.get_world_size(group) == 1:
        return [f"rank 0: {error}"] if error else []
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, error, group=group)
    return [f"rank {r}: {e}" for r, e in enumerate(gathered) if e]


def any_rank(flag: bool, group=None) -> bool:
    """True when ``flag`` is true on any rank (so that every rank stops at the same step)."""
    return all_reduce_floats([1.0 if flag else 0.0], "max", group)[0] > 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    _LONG_WAIT.clear()
    if is_initialized():
        dist.destroy_process_group()

"""Initialise torch.distributed (or DeepSpeed's comm layer) from the detected topology."""

from __future__ import annotations

import datetime as _dt
import os

from bigbatch.launcher.env import Topology, detect_topology, export_env

__all__ = ["init_distributed", "default_backend", "destroy_distributed"]


def default_backend() -> str:
    """``nccl`` when CUDA is usable, else ``gloo``."""
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    topology: Topology | None = None,
    *,
    backend: str | None = None,
    use_deepspeed: bool = False,
    timeout_s: float = 600.0,
) -> Topology:
    """Detect (unless given) the topology, export its ``env://`` variables and initialise the
    process group with them; a no-op for the group if one already exists.

    ``backend``: ``None`` picks :func:`default_backend`. ``use_deepspeed``: initialise through
    ``deepspeed.init_distributed`` (with its own MPI discovery off: we already did it) so that
    DeepSpeed's comm layer and torch's share one group. ``timeout_s``: collective timeout
    (seconds). A single process also gets a (world size 1) group, as DeepSpeed engines need one.
    On CUDA, selects device ``local_rank`` first.
    """
    import torch
    import torch.distributed as dist

    topo = detect_topology() if topology is None else topology
    export_env(topo)
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(topo.local_rank % torch.cuda.device_count())
    timeout = _dt.timedelta(seconds=timeout_s)
    if use_deepspeed:
        import deepspeed

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


def destroy_distributed() -> None:
    """Tear the default process group down if there is one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

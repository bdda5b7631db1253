"""Where am I in the job? One :class:`Topology` from whatever launched this process.

Sources, tried in this order (the first that applies wins):

1. ``torchrun`` / torchelastic: ``TORCHELASTIC_RUN_ID`` with ``RANK``, ``WORLD_SIZE``,
   ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``GROUP_WORLD_SIZE``, ``MASTER_*``.
2. The ``deepspeed`` launcher: ``CROSS_RANK``, ``CROSS_SIZE``, ``LOCAL_SIZE`` with ``RANK``,
   ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_*`` (and no ``GROUP_RANK``, which only torchrun and
   :func:`export_env` write).
3. Plain ``env://`` variables (``RANK`` and ``WORLD_SIZE`` set by hand or by ``bigbatch launch``).
4. SLURM, inside an ``srun`` step (``SLURM_STEP_ID`` set): ``SLURM_PROCID``, ``SLURM_NTASKS``,
   ``SLURM_LOCALID``, ``SLURM_NODEID``, ``SLURM_STEP_TASKS_PER_NODE``, the step's node list.
   The master is the first host of the node list, the port ``20000 + job_id % 40000``
   (``MASTER_ADDR`` / ``MASTER_PORT`` in the environment override both). ``mpirun`` inside an
   allocation also sets SLURM step variables (one "task" per node for its daemons); when MPI
   variables are present and disagree with SLURM's world size, MPI wins.
5. MPI launchers' variables: Open MPI (``OMPI_COMM_WORLD_*``), MVAPICH2 (``MV2_COMM_WORLD_*``),
   MPICH Hydra / Intel MPI (``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``).
   Ranks spread over several hosts need ``mpi4py`` (or ``MASTER_ADDR``) for the master host.
6. ``mpi4py`` discovery: when an MPI runtime is hinted (``PMIX_RANK``, ``PMI_FD``, ...) but no
   variables above name the ranks, or ``BIGBATCH_MPI4PY=1``, or ``mpi4py.MPI`` is already
   imported: ranks from ``COMM_WORLD``, nodes from an allgather of host names.
7. Else a single process (rank 0 of 1, master 127.0.0.1).

A SLURM batch script or ``salloc`` shell (``SLURM_JOB_ID`` but no step) is not a rank: if its
allocation has more than one task, :func:`detect_topology` raises and says to start the workers
with ``srun`` or ``bigbatch launch``.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from bigbatch.launcher.hostlist import HostlistError, expand_hostlist

__all__ = [
    "LauncherEnvError",
    "Topology",
    "detect_topology",
    "export_env",
    "slurm_master_port",
    "expand_tasks_per_node",
    "SOURCES",
    "LAUNCHER_VARS",
]

SOURCES = ("torchrun", "deepspeed", "env", "slurm", "mpi", "mpi4py", "single")
DEFAULT_PORT = 29500
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 40000

_MPI_HINTS = ("PMIX_RANK", "PMIX_NAMESPACE", "PMI_FD", "PMI_RANK", "OMPI_COMM_WORLD_RANK",
              "MV2_COMM_WORLD_RANK", "HYDRA_CONTROL_FD", "I_MPI_HYDRA_HOST_FILE")


class LauncherEnvError(RuntimeError):
    """The environment describes an impossible or incomplete job; the message names the
    variables and their values."""


@dataclass(frozen=True)
class Topology:
    """This process's place in the job.

    Ranks count processes (0-based); nodes count hosts. ``hosts`` lists the job's hosts in node
    order when the source knows them (SLURM, mpi4py), else it is empty.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "single"
    hosts: tuple[str, ...] = ()
    job_id: str | None = None  # the scheduler's job id (SLURM), if any
    restart_count: int = 0  # SLURM_RESTART_COUNT / TORCHELASTIC_RESTART_COUNT

    def __post_init__(self) -> None:
        def bad(msg: str) -> LauncherEnvError:
            return LauncherEnvError(f"inconsistent topology from {self.source}: {msg}")

        if self.source not in SOURCES:
            raise bad(f"source {self.source!r} is not one of {list(SOURCES)}")
        for name in ("world_size", "local_world_size", "num_nodes"):
            if getattr(self, name) < 1:
                raise bad(f"{name}={getattr(self, name)} must be >= 1")
        pairs = (("rank", "world_size"), ("local_rank", "local_world_size"), ("node_rank", "num_nodes"))
        for idx, size in pairs:
            if not 0 <= getattr(self, idx) < getattr(self, size):
                raise bad(f"{idx}={getattr(self, idx)} must be in [0, {size}={getattr(self, size)})")
        if self.local_world_size > self.world_size:
            raise bad(f"local_world_size={self.local_world_size} > world_size={self.world_size}")
        if self.num_nodes > self.world_size:
            raise bad(f"num_nodes={self.num_nodes} > world_size={self.world_size}")
        # torchrun --master_port 0 lets its agent pick the port; workers reach the agent's store.
        if not (1 <= self.master_port <= 65535 or (self.master_port == 0 and self.source == "torchrun")):
            raise bad(f"master_port={self.master_port} must be in [1, 65535] (0 only under torchrun)")
        if not self.master_addr:
            raise bad("master_addr is empty")
        if self.hosts and len(self.hosts) != self.num_nodes:
            raise bad(f"{len(self.hosts)} hosts {list(self.hosts)} but num_nodes={self.num_nodes}")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def env(self) -> dict[str, str]:
        """The ``env://`` variables (torchrun's names) describing this process."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "GROUP_WORLD_SIZE": str(self.num_nodes),
            "NODE_RANK": str(self.node_rank),
            "NNODES": str(self.num_nodes),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            # deepspeed.comm reads these names when it sees no torchrun.
            "CROSS_RANK": str(self.node_rank),
            "CROSS_SIZE": str(self.num_nodes),
            "LOCAL_SIZE": str(self.local_world_size),
        }


# What a launcher tells its workers (every name Topology.env writes, torchrun's marker, the source
# bigbatch recorded). A batch script unsets these: inherited from the submitting shell they would
# override SLURM's ranks.
LAUNCHER_VARS = (*Topology().env(), "TORCHELASTIC_RUN_ID", "BIGBATCH_LAUNCH_SOURCE")


def export_env(topology: Topology, environ: dict | None = None) -> dict[str, str]:
    """Write :meth:`Topology.env` into ``environ`` (default ``os.environ``); returns the dict."""
    target = os.environ if environ is None else environ
    values = topology.env()
    target.update(values)
    return values


# ---------------------------------------------------------------- helpers


def _int(env: Mapping[str, str], name: str, source: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        if default is not None:
            return default
        raise LauncherEnvError(f"{source}: {name} is not set")
    try:
        return int(raw)
    except ValueError:
        raise LauncherEnvError(f"{source}: {name}={raw!r} is not an integer") from None


def _port(env: Mapping[str, str], source: str, default: int) -> int:
    return _int(env, "MASTER_PORT", source, default) if env.get("MASTER_PORT") else default


def slurm_master_port(job_id: int | str) -> int:
    """The rendezvous port of a SLURM job: ``20000 + job_id % 40000`` (20000..59999), so that
    concurrent jobs sharing a first node do not collide. The sbatch templates use the same rule."""
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LauncherEnvError(f"slurm: tasks-per-node {spec!r}: cannot read {part!r}; "
                                   "expected N or N(xM), comma-separated")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out


def _check_size(source: str, rank_name: str, rank: int, size_name: str, size: int) -> None:
    if size < 1:
        raise LauncherEnvError(f"{source}: {size_name}={size} must be >= 1")
    if not 0 <= rank < size:
        raise LauncherEnvError(f"{source}: {rank_name}={rank} must be in [0, {size_name}={size})")


# ---------------------------------------------------------------- sources


def _from_torchrun(env: Mapping[str, str]) -> Topology:
    src = "torchrun"
    world = _int(env, "WORLD_SIZE", src)
    rank = _int(env, "RANK", src)
    _check_size(src, "RANK", rank, "WORLD_SIZE", world)
    local_world = _int(env, "LOCAL_WORLD_SIZE", src)
    local_rank = _int(env, "LOCAL_RANK", src)
    _check_size(src, "LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    node_rank = _int(env, "GROUP_RANK", src, 0)
    nodes = _int(env, "GROUP_WORLD_SIZE", src, max(1, world // local_world))
    _check_size(src, "GROUP_RANK", node_rank, "GROUP_WORLD_SIZE", nodes)
    return Topology(rank, world, local_rank, local_world, node_rank, nodes,
                    env.get("MASTER_ADDR") or "127.0.0.1", _port(env, src, DEFAULT_PORT), src,
                    restart_count=_int(env, "TORCHELASTIC_RESTART_COUNT", src, 0))


def _from_deepspeed(env: Mapping[str, str]) -> Topology:
    src = "deepspeed"
    world = _int(env, "WORLD_SIZE", src)
    rank = _int(env, "RANK", src)
    _check_size(src, "RANK", rank, "WORLD_SIZE", world)
    local_world = _int(env, "LOCAL_SIZE", src)
    local_rank = _int(env, "LOCAL_RANK", src)
    _check_size(src, "LOCAL_RANK", local_rank, "LOCAL_SIZE", local_world)
    node_rank, nodes = _int(env, "CROSS_RANK", src), _int(env, "CROSS_SIZE", src)
    _check_size(src, "CROSS_RANK", node_rank, "CROSS_SIZE", nodes)
    return Topology(rank, world, local_rank, local_world, node_rank, nodes,
                    env.get("MASTER_ADDR") or "127.0.0.1", _port(env, src, DEFAULT_PORT), src)


def _from_plain_env(env: Mapping[str, str]) -> Topology:
    src = "env"
    world = _int(env, "WORLD_SIZE", src)
    rank = _int(env, "RANK", src)
    _check_size(src, "RANK", rank, "WORLD_SIZE", world)
    # Without local sizes, assume one node (what a hand-written RANK/WORLD_SIZE usually means).
    local_world = _int(env, "LOCAL_WORLD_SIZE", src, world)
    local_rank = _int(env, "LOCAL_RANK", src, rank if local_world == world else -1)
    _check_size(src, "LOCAL_RANK", local_rank, "LOCAL_WORLD_SIZE", local_world)
    nodes = _int(env, "GROUP_WORLD_SIZE", src, _int(env, "NNODES", src, max(1, world // local_world)))
    node_rank = _int(env, "GROUP_RANK", src, _int(env, "NODE_RANK", src, rank // local_world))
    _check_size(src, "GROUP_RANK", node_rank, "GROUP_WORLD_SIZE", nodes)
    if nodes > 1 and not env.get("MASTER_ADDR"):
        raise LauncherEnvError(f"env: {nodes} nodes (GROUP_WORLD_SIZE) but MASTER_ADDR is not set")
    return Topology(rank, world, local_rank, local_world, node_rank, nodes,
                    env.get("MASTER_ADDR") or "127.0.0.1", _port(env, src, DEFAULT_PORT), src)


def _from_slurm(env: Mapping[str, str]) -> Topology:
    src = "slurm"
    if not env.get("SLURM_PROCID"):
        raise LauncherEnvError(
            f"slurm: inside step {env.get('SLURM_STEP_ID')} of job {env.get('SLURM_JOB_ID')} "
            "but SLURM_PROCID is not set")
    world = _int(env, "SLURM_STEP_NUM_TASKS", src, _int(env, "SLURM_NTASKS", src, 0) or
                 _int(env, "SLURM_NPROCS", src, 0) or None)
    rank = _int(env, "SLURM_PROCID", src)
    _check_size(src, "SLURM_PROCID", rank, "SLURM_NTASKS", world)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LauncherEnvError("slurm: none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set")
    try:
        hosts = expand_hostlist(nodelist)
    except HostlistError as exc:
        raise LauncherEnvError(f"slurm: {exc}") from None
    nodes = _int(env, "SLURM_STEP_NUM_NODES", src, _int(env, "SLURM_NNODES", src, len(hosts)))
    if len(hosts) != nodes:
        raise LauncherEnvError(f"slurm: node list {nodelist!r} has {len(hosts)} hosts but the step "
                               f"has {nodes} nodes (SLURM_STEP_NUM_NODES/SLURM_NNODES)")
    node_rank = _int(env, "SLURM_NODEID", src)
    _check_size(src, "SLURM_NODEID", node_rank, "SLURM_NNODES", nodes)
    local_rank = _int(env, "SLURM_LOCALID", src)
    tpn = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if tpn:
        counts = expand_tasks_per_node(tpn)
        if len(counts) != nodes or sum(counts) != world:
            raise LauncherEnvError(f"slurm: tasks per node {tpn!r} (= {counts}) does not match "
                                   f"{nodes} nodes and {world} tasks")
        local_world = counts[node_rank]
    elif world % nodes == 0:
        local_world = world // nodes
    else:
        raise LauncherEnvError(f"slurm: SLURM_STEP_TASKS_PER_NODE is unset and {world} tasks do "
                               f"not split evenly over {nodes} nodes")
    _check_size(src, "SLURM_LOCALID", local_rank, "tasks on this node", local_world)
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    port = _port(env, src, slurm_master_port(job_id) if job_id and job_id.isdigit() else DEFAULT_PORT)
    return Topology(rank, world, local_rank, local_world, node_rank, nodes,
                    env.get("MASTER_ADDR") or hosts[0], port, src, tuple(hosts), job_id,
                    _int(env, "SLURM_RESTART_COUNT", src, 0))


_MPI_VARS = (  # (name, rank, size, local rank, local size)
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
     "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH/Intel MPI", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
)


def _mpi_flavour(env: Mapping[str, str]):
    for flavour in _MPI_VARS:
        if env.get(flavour[1]) is not None and env.get(flavour[2]) is not None:
            return flavour
    return None


def _from_mpi(env: Mapping[str, str], flavour, allow_mpi4py: bool = True) -> Topology:
    name, r, s, lr, ls = flavour
    src = "mpi"
    world, rank = _int(env, s, src), _int(env, r, src)
    _check_size(f"mpi ({name})", r, rank, s, world)
    if env.get(lr) is None or env.get(ls) is None or _int(env, ls, src) != world:
        # Ranks may span hosts: only MPI itself knows which (node ids, master host).
        if not allow_mpi4py:
            raise LauncherEnvError(f"mpi ({name}): ranks may span hosts and mpi4py is not allowed")
        return _from_mpi4py(env, via=f"{name} variables {r}/{s}")
    local_rank, local_world = _int(env, lr, src), _int(env, ls, src)
    _check_size(f"mpi ({name})", lr, local_rank, ls, local_world)
    port = _port(env, src, DEFAULT_PORT)
    if not env.get("MASTER_PORT") and world > 1 and _mpi4py_importable():
        port = _mpi_bcast_port()
    return Topology(rank, world, local_rank, local_world, 0, 1,
                    env.get("MASTER_ADDR") or "127.0.0.1", port, src)


def _mpi4py_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mpi_bcast_port() -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    return comm.bcast(free_port() if comm.Get_rank() == 0 else None, root=0)


def _from_mpi4py(env: Mapping[str, str], via: str = "mpi4py discovery") -> Topology:
    src = "mpi4py" if via == "mpi4py discovery" else "mpi"
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LauncherEnvError(f"{via}: the ranks' hosts are unknown and mpi4py cannot be "
                               f"imported ({exc}); install bigbatch[mpi] or set MASTER_ADDR, "
                               "LOCAL_RANK and LOCAL_WORLD_SIZE") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    host = socket.gethostname()
    hosts_by_rank = comm.allgather(host)
    hosts = list(dict.fromkeys(hosts_by_rank))  # node order = order of first rank on each host
    node_rank = hosts.index(host)
    local_rank = hosts_by_rank[:rank].count(host)
    local_world = hosts_by_rank.count(host)
    port = _port(env, src, 0) or comm.bcast(free_port() if rank == 0 else None, root=0)
    master = env.get("MASTER_ADDR") or ("127.0.0.1" if len(hosts) == 1 else hosts[0])
    return Topology(rank, world, local_rank, local_world, node_rank, len(hosts), master, port,
                    src, tuple(hosts))


def detect_topology(environ: Mapping[str, str] | None = None, *, allow_mpi4py: bool = True) -> Topology:
    """Read this process's :class:`Topology` from ``environ`` (default ``os.environ``), trying
    the sources in the module docstring's order. Raises :class:`LauncherEnvError` on an
    incomplete or impossible environment. mpi4py is consulted only with ``allow_mpi4py``."""
    env = os.environ if environ is None else environ
    if env.get("TORCHELASTIC_RUN_ID"):
        return _from_torchrun(env)
    # Our own export_env also writes CROSS_* (deepspeed.comm reads them) but, unlike the deepspeed
    # launcher, GROUP_RANK too.
    if (env.get("CROSS_RANK") is not None and env.get("CROSS_SIZE") is not None
            and env.get("RANK") is not None and env.get("GROUP_RANK") is None):
        return _from_deepspeed(env)
    if env.get("RANK") is not None or env.get("WORLD_SIZE") is not None:
        return _from_plain_env(env)
    if env.get("SLURM_STEP_ID") is not None or env.get("SLURM_STEPID") is not None:
        topo = _from_slurm(env)
        flavour = _mpi_flavour(env)
        # mpirun inside an allocation: SLURM's step is mpirun's daemons, not the ranks.
        if flavour is None or _int(env, flavour[2], "mpi") == topo.world_size:
            return topo
        return _from_mpi(env, flavour, allow_mpi4py)
    if env.get("SLURM_NTASKS") or env.get("SLURM_PROCID"):
        ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
        flavour = _mpi_flavour(env)
        if flavour is None and ntasks != "1":
            raise LauncherEnvError(
                f"slurm: SLURM_NTASKS={ntasks} in job {env.get('SLURM_JOB_ID')} but this process is "
                "not a task of an srun step (SLURM_STEP_ID unset; SLURM_PROCID="
                f"{env.get('SLURM_PROCID')!r}): start the workers with `srun` or `bigbatch launch`")
    flavour = _mpi_flavour(env)
    if flavour is not None:
        return _from_mpi(env, flavour, allow_mpi4py)
    if allow_mpi4py and (env.get("BIGBATCH_MPI4PY") == "1" or "mpi4py.MPI" in sys.modules
                         or any(env.get(h) for h in _MPI_HINTS)):
        return _from_mpi4py(env)
    # A lone process: any free port, so that concurrent single-process runs never collide.
    return Topology(master_port=_port(env, "single", 0) or free_port(), source="single")


"""Launcher: find this process's place in the job (torchrun, deepspeed, SLURM, MPI, mpi4py or a
lone process), initialise torch.distributed from it, and submit jobs to SLURM.

``detect_topology()`` -> :class:`Topology`; ``init_distributed()`` exports the ``env://``
variables and starts the process group; ``expand_hostlist("gpu[01-03,07],cpu5")``; the
``bigbatch`` command (``launch``, ``submit``, ``env``) lives in :mod:`bigbatch.launcher.cli`.
"""

from bigbatch.launcher.distributed import default_backend, destroy_distributed, init_distributed
from bigbatch.launcher.env import (
    SOURCES,
    LauncherEnvError,
    Topology,
    detect_topology,
    expand_tasks_per_node,
    export_env,
    slurm_master_port,
)
from bigbatch.launcher.hostlist import HostlistError, expand_hostlist
from bigbatch.launcher.submit import SubmitConfig, SubmitError, render_sbatch, submit

__all__ = [
    "SOURCES", "HostlistError", "LauncherEnvError", "SubmitConfig", "SubmitError", "Topology",
    "default_backend", "destroy_distributed", "detect_topology", "expand_hostlist",
    "expand_tasks_per_node", "export_env", "init_distributed", "render_sbatch", "slurm_master_port",
    "submit",
]

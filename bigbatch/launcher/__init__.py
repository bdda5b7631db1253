"""Launcher: find this process's place in the job (torchrun, deepspeed, SLURM, MPI, mpi4py or a
lone process), start workers, and submit jobs to SLURM.

``detect_topology()`` -> :class:`Topology` (``bigbatch.distributed.init_distributed`` starts the
process group from it); ``expand_hostlist("gpu[01-03,07],cpu5")``; the ``bigbatch`` command
(``launch``, ``submit``, ``env``) lives in :mod:`bigbatch.cli`.
"""

from bigbatch.launcher.env import (
    SOURCES,
    LauncherEnvError,
    Topology,
    detect_topology,
    expand_tasks_per_node,
    export_env,
    free_port,
    slurm_master_port,
)
from bigbatch.launcher.hostlist import HostlistError, expand_hostlist
from bigbatch.launcher.submit import SubmitConfig, SubmitError, render_sbatch, submit

__all__ = [
    "SOURCES", "HostlistError", "LauncherEnvError", "SubmitConfig", "SubmitError", "Topology",
    "detect_topology", "expand_hostlist",
    "expand_tasks_per_node", "export_env", "free_port", "render_sbatch", "slurm_master_port",
    "submit",
]

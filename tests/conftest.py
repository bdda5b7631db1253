"""Shared fixtures. ``slurm_cluster``: one real SLURM cluster (munged, slurmctld, two slurmd
nodes) for the whole session, started by scripts/slurm_cluster.sh and torn down at the end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
SLURM_DIR = os.environ.get("BIGBATCH_SLURM_DIR", "/tmp/bigbatch-slurm")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE"}


def _share_cores() -> None:
    """Each of the N pytest-xdist workers, and every process it starts, gets cores / N threads. torch's default
    (a thread per core, each spinning after a parallel region) on several workers oversubscribes the cores, and
    an in-process kernel then waits on its descheduled threads (on 2 cores, test_optim took 74 s with it, 51 s
    without). Set before any test imports torch; an OMP_NUM_THREADS of the caller's is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // workers)))


_share_cores()


def _cluster_prerequisites() -> str | None:
    """Why the cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return f"needs root to start slurmctld/slurmd and edit /etc/hosts; running as uid {os.geteuid()}"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "srun") if shutil.which(b) is None]
    if missing:
        return (f"SLURM not installed ({', '.join(missing)} missing): run "
                "`bash scripts/slurm_cluster.sh install` (root, Debian 12) first")
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        return "cannot create UTS namespaces (`unshare --uts true` failed): nodes need distinct host names"
    return None


class SlurmCluster:
    """Handles to the running test cluster (2 nodes: node1, node2; partitions debug, high)."""

    nodes = ("node1", "node2")

    def __init__(self, conf: str):
        self.conf = conf

    def run(self, *argv: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields; {} once the job has left slurmctld (MinJobAge)."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (or gone: returns {} if "GONE" in states)."""
        end = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < end:
            info = self.job_info(job_id)
            if (not info and "GONE" in states) or info.get("JobState") in states:
                return info
            if not info:
                raise AssertionError(f"job {job_id} vanished while waiting for {states}")
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {info}")

    def wait_done(self, job_id: str, timeout: float = 180) -> dict[str, str]:
        """Wait for a terminal state; the info is {} when the job already aged out."""
        return self.wait_state(job_id, TERMINAL | {"GONE"}, timeout)

    def logs(self) -> str:
        """Tails of the daemons' logs, for failure messages."""
        out = []
        for p in sorted(Path(SLURM_DIR, "log").glob("*.log")):
            out.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)


# The files whose tests use the SLURM cluster: under pytest-xdist they run on one worker, which starts the
# cluster once (two workers' jobs would queue behind each other on its two nodes).
CLUSTER_FILES = {"tests/test_slurm.py", "tests/test_scale_out.py", "tests/test_prepare.py", "tests/test_mpi.py"}


# Seconds of each file's slow tests, measured in one process on 2 cores (pytest --durations=0): the files start
# longest first (the SLURM cluster's files as one unit), and the short ones fill the end, so that neither worker
# is left running a long file alone. A file not listed counts as 0.
SECONDS = {"slurm cluster": 255, "tests/test_reliability.py": 198, "tests/test_hf.py": 97,
           "tests/test_batch_schedule.py": 65, "tests/test_fsdp2.py": 64, "tests/test_cross_engine.py": 61,
           "tests/test_train.py": 55, "tests/test_sharding.py": 51, "tests/test_check_rules.py": 43,
           "tests/test_compile.py": 40, "tests/test_hf_export.py": 37, "tests/test_gpu_check.py": 31,
           "tests/test_step_reads.py": 31, "tests/test_bad_input.py": 15, "tests/test_optim.py": 15}


def _unit(nodeid: str) -> str:
    """The unit a worker takes whole: the test's file, or one unit for the files on the SLURM cluster."""
    path = nodeid.split("::", 1)[0]
    return "slurm cluster" if path in CLUSTER_FILES else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's workers (``-n 2`` in pyproject.toml) take whole units (:func:`_unit`), so the runs a
    file's module fixtures share start once, in the order of the collection (longest first)."""
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False  # xdist's own order is by number of tests
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SECONDS.get(_unit(item.nodeid), 0))  # stable: a file keeps its order
    stray = [item.nodeid for item in items if "slurm_cluster" in getattr(item, "fixturenames", ())
             and _unit(item.nodeid) != "slurm cluster"]
    if stray:
        raise pytest.UsageError(f"tests on the SLURM cluster outside CLUSTER_FILES (tests/conftest.py): {stray}")


@pytest.fixture(autouse=True)
def _restore_environ():
    """Every test leaves os.environ as it found it: an in-process run exports its launcher variables
    (RANK, WORLD_SIZE, MASTER_PORT), and sbatch would hand them to every later job."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> str:
    """The data cache (tokenizer, packed blocks) of the tests that launch train.py: built once."""
    return str(tmp_path_factory.mktemp("bbcache"))


@pytest.fixture(scope="session")
def slurm_cluster():
    why = _cluster_prerequisites()
    if why:
        pytest.fail(f"real SLURM cluster unavailable: {why}", pytrace=False)
    env = {**os.environ, "BIGBATCH_SLURM_DIR": SLURM_DIR}
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, env=env, timeout=120)
    conf = f"{SLURM_DIR}/slurm.conf"
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        if up.returncode != 0:
            pytest.fail(f"scripts/slurm_cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}",
                        pytrace=False)
        yield SlurmCluster(conf)
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], capture_output=True, env=env, timeout=120)
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf

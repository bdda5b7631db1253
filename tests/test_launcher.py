"""Launcher without a cluster: host lists against real ``scontrol``, environment detection,
sbatch rendering, and ``bigbatch launch`` with real worker processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bigbatch.launcher import (
    HostlistError,
    LauncherEnvError,
    SubmitConfig,
    SubmitError,
    Topology,
    detect_topology,
    expand_hostlist,
    expand_tasks_per_node,
    export_env,
    render_sbatch,
    slurm_master_port,
)
from bigbatch.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "dist_probe.py")
BIGBATCH = [sys.executable, "-m", "bigbatch.cli"]

# ---------------------------------------------------------------- host lists vs scontrol

VALID_LISTS = [
    "gpu[01-03,07],cpu5", "a[1-2]b[3-4]", "n[8-11]", "n[098-101]", "a[1-2],b", "rack[1-2]-node[01-02]",
    "n[1,3-5]x[7-8]", "foo", "a[01-3]", "a[1-03]", "a,b,,c", "node1 node2", "a[1-2],a[1-2]", "n[9-10]",
    "n[09-10]", "n[0-0]", "n[1-2][3-4]", "a1,a2", "[1-2]", "n[007]", "n[1-2],", ",a",
    "c[1-3,5,7-8]", "tux[0-2],gpu[100-101],login", "node-[0001-0003]", "x[000-002]y[8-9]z[1]",
    "r[1-2]n[1-2]s[1-2]", "n[10-12,1-2]", "node1.cluster", "n[99-101],m[0-1]", "a[1-3]b[1-2]c[1-2]",
    "a[1-2]b[1-3]c[1]", "w[1-2]x[1-2]y[1-2]z[1-2]",
]
# scontrol rejects all of these, and so do we.
INVALID_LISTS = ["n[5-3]", "n[a-b]", "n[1-3x]", "n[]", "n[-3]", "a[1-2]]", "n[1-2,]", "n[,1]"]


@pytest.fixture(scope="module")
def scontrol_env(tmp_path_factory):
    if shutil.which("scontrol") is None:
        pytest.fail("scontrol not installed: run `bash scripts/slurm_cluster.sh install` (root, Debian 12)",
                    pytrace=False)
    # `scontrol show hostnames` needs some configuration, never a running controller.
    conf = tmp_path_factory.mktemp("slurmconf") / "slurm.conf"
    conf.write_text("ClusterName=hl\nSlurmctldHost=localhost\nNodeName=n1\nPartitionName=p Nodes=n1\n")
    return {**os.environ, "SLURM_CONF": str(conf)}


def _scontrol_hostnames(hostlist: str, env) -> tuple[list[str] | None, str]:
    proc = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True, env=env)
    out = proc.stdout + proc.stderr
    if "Invalid" in out or "error" in out:
        return None, out
    return proc.stdout.split(), out


def test_hostlist_matches_scontrol(scontrol_env):
    for hl in VALID_LISTS:
        want, raw = _scontrol_hostnames(hl, scontrol_env)
        assert want is not None, f"scontrol rejected {hl!r}: {raw}"
        assert expand_hostlist(hl) == want, hl
    for hl in INVALID_LISTS:
        want, raw = _scontrol_hostnames(hl, scontrol_env)
        assert want is None, f"scontrol accepted {hl!r}: {raw}"
        with pytest.raises(HostlistError, match="host list"):
            expand_hostlist(hl)


def _random_hostlist(rng) -> str:
    items = []
    for _ in range(rng.randint(1, 3)):
        item = rng.choice(["n", "gpu", "r", "a-", ""])
        for g in range(rng.randint(0, 3)):
            ranges = []
            for _ in range(rng.randint(1, 3)):
                lo = rng.randint(0, 120)
                width = rng.choice([0, 0, 2, 3])
                lo_s = str(lo).zfill(width)
                ranges.append(lo_s if rng.random() < 0.3 else f"{lo_s}-{lo + rng.randint(0, 3)}")
            item += "[" + ",".join(ranges) + "]" + (rng.choice(["b", "x", "-n"]) if g < 2 else "")
        item = item.rstrip("bx-n") if item and item[-1] != "]" and "[" in item else item
        items.append(item or "solo")
    return ",".join(items)


def test_hostlist_matches_scontrol_random(scontrol_env):
    import random

    rng = random.Random(1234)
    checked = 0
    for _ in range(60):
        hl = _random_hostlist(rng)
        want, raw = _scontrol_hostnames(hl, scontrol_env)
        if want is None:  # e.g. text after the last group: 22.05 rejects, we accept
            continue
        assert expand_hostlist(hl) == want, hl
        checked += 1
    assert checked >= 40


def test_hostlist_round_trip_through_scontrol_compression(scontrol_env):
    # scontrol compresses names into its own bracket syntax; expanding that must give them back.
    names = ["gpu001", "gpu002", "gpu003", "gpu010", "cpu7", "cpu8", "login", "a1b1", "a1b2", "n9", "n10"]
    proc = subprocess.run(["scontrol", "show", "hostlist", ",".join(names)], capture_output=True, text=True,
                          env=scontrol_env, check=True)
    compressed = proc.stdout.strip()
    assert "[" in compressed
    assert expand_hostlist(compressed) == _scontrol_hostnames(compressed, scontrol_env)[0]
    assert sorted(expand_hostlist(compressed)) == sorted(names)


def test_hostlist_errors_name_the_problem():
    with pytest.raises(HostlistError, match="not closed"):
        expand_hostlist("n[1-2")
    with pytest.raises(HostlistError, match="without a matching"):
        expand_hostlist("n]1")
    with pytest.raises(HostlistError, match="nested"):
        expand_hostlist("n[1[2]]")
    with pytest.raises(HostlistError, match="more than"):
        expand_hostlist("n[0-99999999]")
    assert expand_hostlist("") == []
    assert expand_hostlist("x[1-2]y") == ["x1y", "x2y"]  # a suffix: accepted on purpose


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(LauncherEnvError, match="tasks-per-node"):
        expand_tasks_per_node("2x3")


# ---------------------------------------------------------------- detection


def _slurm_step(**over):
    # Variables as a real `srun -N2 -n3` step printed them on the test cluster (rank 2, node2).
    env = {
        "SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0",
        "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_NTASKS": "3",
        "SLURM_NPROCS": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_STEP_NODELIST": "node[1-2]",
        "SLURM_STEP_TASKS_PER_NODE": "2,1", "SLURM_TASKS_PER_NODE": "2,1", "SLURMD_NODENAME": "node2",
    }
    env.update(over)
    return {k: v for k, v in env.items() if v is not None}


def test_detect_slurm_step():
    t = detect_topology(_slurm_step(), allow_mpi4py=False)
    assert (t.source, t.rank, t.world_size, t.local_rank, t.local_world_size) == ("slurm", 2, 3, 0, 1)
    assert (t.node_rank, t.num_nodes, t.hosts, t.master_addr) == (1, 2, ("node1", "node2"), "node1")
    assert t.master_port == slurm_master_port(1) == 20001
    t = detect_topology(_slurm_step(SLURM_PROCID="1", SLURM_LOCALID="1", SLURM_NODEID="0",
                                    SLURM_STEP_NODELIST="gpu[07-08]", SLURM_JOB_ID="123456",
                                    SLURM_RESTART_COUNT="2", MASTER_PORT="31000"), allow_mpi4py=False)
    assert (t.rank, t.local_rank, t.local_world_size, t.master_addr) == (1, 1, 2, "gpu07")
    assert (t.master_port, t.job_id, t.restart_count) == (31000, "123456", 2)


@pytest.mark.parametrize("over, match", [
    ({"SLURM_PROCID": None}, "SLURM_PROCID is not set"),
    ({"SLURM_PROCID": "3"}, r"SLURM_PROCID=3 must be in \[0, SLURM_NTASKS=3\)"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ({"SLURM_STEP_NODELIST": "node[1-3]"}, "has 3 hosts but the step has 2 nodes"),
    ({"SLURM_STEP_NODELIST": "node[2-1]"}, "low > high"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, "does not match 2 nodes and 3 tasks"),
    ({"SLURM_NODEID": "2"}, r"SLURM_NODEID=2 must be in \[0, SLURM_NNODES=2\)"),
    ({"SLURM_LOCALID": "1"}, r"SLURM_LOCALID=1 must be in \[0, tasks on this node=1\)"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "SLURM_STEP_NODELIST"),
])
def test_detect_slurm_inconsistent(over, match):
    with pytest.raises(LauncherEnvError, match=match):
        detect_topology(_slurm_step(**over), allow_mpi4py=False)


def test_batch_shell_is_not_a_rank():
    # The batch script of a 4-task job: SLURM_PROCID=0 but no step.
    env = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "node[1-2]"}
    with pytest.raises(LauncherEnvError, match="SLURM_NTASKS=4 .* not a task of an srun step"):
        detect_topology(env, allow_mpi4py=False)
    with pytest.raises(LauncherEnvError, match="SLURM_NTASKS=4"):
        detect_topology({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, allow_mpi4py=False)
    t = detect_topology({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, allow_mpi4py=False)
    assert (t.source, t.world_size) == ("single", 1)


def test_detect_order_and_sources():
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
                "MASTER_PORT": "1234", "TORCHELASTIC_RESTART_COUNT": "1"}
    # torchrun wins over SLURM (torchrun inside an srun step).
    t = detect_topology({**_slurm_step(), **torchrun}, allow_mpi4py=False)
    assert (t.source, t.rank, t.world_size, t.node_rank, t.master_addr, t.master_port, t.restart_count) == \
        ("torchrun", 5, 8, 1, "h0", 1234, 1)
    ds = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", "CROSS_RANK": "1",
          "CROSS_SIZE": "2", "MASTER_ADDR": "h1", "MASTER_PORT": "29501"}
    t = detect_topology({**_slurm_step(), **ds}, allow_mpi4py=False)
    assert (t.source, t.rank, t.local_world_size, t.node_rank, t.num_nodes) == ("deepspeed", 3, 2, 1, 2)
    t = detect_topology({"RANK": "1", "WORLD_SIZE": "2"}, allow_mpi4py=False)
    assert (t.source, t.local_rank, t.local_world_size, t.num_nodes, t.master_addr) == ("env", 1, 2, 1, "127.0.0.1")
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "29999"}
    t = detect_topology(ompi, allow_mpi4py=False)
    assert (t.source, t.rank, t.local_rank, t.num_nodes, t.master_port) == ("mpi", 1, 1, 1, 29999)
    hydra = {"PMI_RANK": "0", "PMI_SIZE": "3", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "3", "MASTER_PORT": "1"}
    t = detect_topology(hydra, allow_mpi4py=False)
    assert (t.source, t.world_size, t.local_world_size) == ("mpi", 3, 3)
    t = detect_topology({}, allow_mpi4py=False)
    assert (t.source, t.rank, t.world_size) == ("single", 0, 1)
    assert 0 < t.master_port < 65536


def test_detect_mpirun_inside_allocation_prefers_mpi():
    # mpirun in a batch script launches its daemons with srun: one SLURM "task" per node.
    env = _slurm_step(SLURM_PROCID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_NNODES="1",
                      SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="node1", SLURM_STEP_TASKS_PER_NODE="1",
                      SLURM_NODEID="0")
    env.update({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": "29000"})
    t = detect_topology(env, allow_mpi4py=False)
    assert (t.source, t.rank, t.world_size) == ("mpi", 1, 2)


@pytest.mark.parametrize("env, match", [
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 must be in \[0, WORLD_SIZE=2\)"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
    ({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "MASTER_ADDR is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "LOCAL_WORLD_SIZE is not set"),
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
     r"LOCAL_RANK=2 must be in \[0, LOCAL_WORLD_SIZE=2\)"),
    ({"OMPI_COMM_WORLD_RANK": "4", "OMPI_COMM_WORLD_SIZE": "4"}, r"OMPI_COMM_WORLD_RANK=4 must be in"),
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, "ranks may span hosts and mpi4py is not allowed"),
])
def test_detect_inconsistent(env, match):
    with pytest.raises(LauncherEnvError, match=match):
        detect_topology(env, allow_mpi4py=False)


def test_topology_validation_and_export_round_trip():
    with pytest.raises(LauncherEnvError, match="num_nodes=3 > world_size=2"):
        Topology(0, 2, 0, 1, 0, 3)
    with pytest.raises(LauncherEnvError, match="master_port=70000"):
        Topology(master_port=70000)
    t = Topology(5, 8, 1, 4, 1, 2, "node1", 20001, "slurm", ("node1", "node2"), "1")
    env: dict = {}
    export_env(t, env)
    back = detect_topology(env, allow_mpi4py=False)
    assert (back.rank, back.world_size, back.local_rank, back.local_world_size, back.node_rank,
            back.num_nodes, back.master_addr, back.master_port) == (5, 8, 1, 4, 1, 2, "node1", 20001)
    assert back.source == "env"  # our own export is not mistaken for the deepspeed launcher


# ---------------------------------------------------------------- sbatch rendering


def test_submit_refuses_a_batch_or_scale_out_policy_train_py_would(tmp_path, capsys):
    """The world size submit starts (nodes x tasks per node) gets train.py's batch and scale-out checks."""
    policy = ["train.py", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "r"), "--batch.schedule", "auto",
              "--batch.max_global_batch", "64", "--scale_out.max_nodes", "2", "--scale_out.max_grad_accum", "1"]
    sub = ["submit", "--dry-run", "--chdir", str(REPO)]
    assert cli_main([*sub, "--", *policy]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bigbatch submit: train.py would refuse this command at start on 1 node(s) x 1 "
                          "process(es): scale_out.max_grad_accum: 1 micro batches") and "global batch 64" in err, err
    assert len(err.splitlines()) == 1
    # on up to 4 nodes the schedule's 64 fits (16 per node): accepted
    assert cli_main([*sub, "--nodes", "2", "--max-nodes", "4", "--", *policy, "--scale_out.max_nodes", "4"]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash")
    # a fixed batch that 3 processes cannot form
    assert cli_main([*sub, "--nodes", "3", "--", "train.py", "--config", "configs/tiny.yaml",
                     "--out", str(tmp_path / "r")]) == 2
    assert "on 3 node(s) x 1 process(es): batch" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_render_srun_template(tmp_path, capsys):
    # submit checks train.py's config, and its batch on 2 nodes x 4 processes: micro batches of 2 form 16
    (tmp_path / "x y.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text().replace(
        "micro_batch_sizes: [16, 8, 4]", "micro_batch_sizes: [2, 1]"))
    rc = cli_main(["submit", "--dry-run", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                   "--account", "proj", "--time", "04:00:00", "--signal-seconds", "300", "--env", "A=b c",
                   "--srun-arg=--mpi=pmix", "--chdir", str(tmp_path), "--", "train.py", "--config", "x y.yaml",
                   "--resume", "run"])
    assert rc == 0
    script = capsys.readouterr().out
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=04:00:00",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", f"#SBATCH --chdir={tmp_path}",
                 "export A='b c'", 'scontrol requeue "$SLURM_JOB_ID"', 'if [ "$got_term" = 0 ] && [ "$rc" = 75 ]'):
        assert line in script, line
    assert f"srun --wait=60 --mpi=pmix {sys.executable} train.py --config 'x y.yaml' --resume run &" in script
    assert "{{" not in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)  # valid bash


def test_render_torchrun_template_and_no_requeue(tmp_path):
    script = render_sbatch(SubmitConfig(command=["-m", "pkg.train", "--a", "1"], nodes=3, gpus_per_node=8,
                                        template="torchrun", requeue=False, workdir=str(tmp_path)))
    assert "#SBATCH --ntasks-per-node=1" in script and "--nproc-per-node=8" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --no-requeue" in script and "--signal" not in script.split("set -u")[0]
    assert "-m pkg.train --a 1 &" in script and "rdzv_port=$(( 20000 + SLURM_JOB_ID % 40000 ))" in script
    assert 'if [ "$got_term" = 0 ] && false; then' in script
    path = tmp_path / "t.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    script = render_sbatch(SubmitConfig(command=["./run.sh", "x"], template="torchrun", workdir=str(tmp_path)))
    assert "--no-python ./run.sh x &" in script


@pytest.mark.parametrize("kw, match", [
    ({"template": "mpirun"}, "--template: 'mpirun' is not one of"),
    ({"time": "soon"}, "--time: 'soon' is not a SLURM time"),
    ({"nodes": 0}, "--nodes: 0 must be >= 1"),
    ({"gpus_per_node": -1}, "--gpus-per-node: -1 must be >= 0"),
    ({"command": []}, "nothing to run"),
    ({"env": {"1A": "x"}}, "--env: '1A' is not a variable name"),
    ({"job_name": "a\nb"}, "newlines are not allowed"),
])
def test_submit_config_errors(kw, match):
    args = {"command": ["train.py"], **kw}
    with pytest.raises(SubmitError, match=match):
        render_sbatch(SubmitConfig(**args))


def test_unknown_template_field_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "srun.sbatch").write_text("#!/bin/bash\n#SBATCH --nodes={{nodes}}\n{{nodez}}\n")
    monkeypatch.setenv("BIGBATCH_SLURM_TEMPLATES", str(tmp_path))
    with pytest.raises(SubmitError, match=r"unknown fields \['nodez'\]"):
        render_sbatch(SubmitConfig(command=["train.py"]))


def test_cli_reports_bad_options(capsys):
    assert cli_main(["submit", "--dry-run", "--time", "x", "--", "train.py"]) == 2
    assert "--time: 'x' is not a SLURM time" in capsys.readouterr().err


# ---------------------------------------------------------------- bigbatch launch, real processes


def _wait_file(path: Path, timeout: float = 60):
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.1)


@pytest.mark.slow
def test_launch_local_preempt_resume_rescale(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI"))}
    proc = subprocess.Popen([*BIGBATCH, "launch", "--nproc-per-node", "2", PROBE, "--out", str(out),
                             "--steps", "8", "--wait-at", "3"], env=env, stdout=subprocess.PIPE,
                            text=True)
    _wait_file(out / "waiting")  # every worker waits before step 3 for the signal
    proc.send_signal(signal.SIGUSR1)  # the launcher passes it on; the workers checkpoint
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, stdout
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"], r["local_rank"], r["source"], r["allreduce"]) for r in ranks] == \
        [(0, 2, 0, "env", 3.0), (1, 2, 1, "env", 3.0)]
    assert ranks[0]["master_port"] == ranks[1]["master_port"]
    ckpt = json.loads((out / "ckpt.json").read_text())
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    # Resume with one worker: the probe logs its rescaled batch; no step lost or repeated.
    res = subprocess.run([*BIGBATCH, "launch", PROBE, "--out", str(out), "--steps", str(ckpt["step"] + 3)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "rescaled: world_size 2 -> 1 global_batch 8 -> 4" in res.stdout
    steps = [int(line.split()[0]) for line in (out / "steps.log").read_text().splitlines()]
    assert steps == list(range(ckpt["step"] + 3))


@pytest.mark.slow
def test_launch_local_failure_stops_the_rest(tmp_path):
    code = ("import os, sys, time\n"
            "if os.environ['RANK'] == '1': sys.exit(3)\n"
            "time.sleep(120)\n")
    t0 = time.monotonic()
    res = subprocess.run([*BIGBATCH, "launch", "--nproc-per-node", "3", sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3
    assert time.monotonic() - t0 < 60  # the sleepers were terminated, not waited for


def test_torchrun_master_port_zero_is_accepted_only_from_torchrun():
    # `torchrun --master_port 0`: the agent picks the port and workers use its store.
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}
    assert detect_topology(env, allow_mpi4py=False).master_port == 0
    with pytest.raises(LauncherEnvError, match="master_port=0"):
        detect_topology({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "0"},
                        allow_mpi4py=False)

"""Real SLURM jobs on the session's two-node test cluster (tests/conftest.py: slurm_cluster).

The launcher path runs with tests/dist_probe.py (seconds per job); the end-to-end runs use
train.py with configs/tiny.yaml shrunk by CLI overrides.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path


import pytest

from bigbatch.launcher import slurm_master_port
from train_common import FAULT_TRAIN, wait_at_step

pytestmark = pytest.mark.slow  # real process groups / daemons

REPO = Path(__file__).resolve().parents[1]
PROBE = str(REPO / "tests" / "dist_probe.py")
BIGBATCH = [sys.executable, "-m", "bigbatch.cli"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
# configs/tiny.yaml made small enough that a 4-rank job on 2 cores takes seconds per phase.
TRAIN_TINY = [
    "--config", str(REPO / "configs" / "tiny.yaml"),
    "--model.hidden_size", "32", "--model.num_layers", "1", "--model.num_heads", "2",
    "--model.intermediate_size", "64",
    "--tokenizer.vocab_size", "300", "--tokenizer.train_chars", "50000", "--data.max_chars", "200000",
    "--data.seq_len", "32", "--batch.reference_global_batch", "8", "--batch.micro_batch_sizes", "2",
    "--schedule.warmup_tokens", "256", "--train.eval_every", "0",
    "--train.log_every", "1", "--logging.progress", "lines", "--logging.tensorboard", "false",
    "--logging.plot", "false", "--train.threads", "1",
]


# A submitting shell's leftovers from some launcher: the batch script must not let them name the ranks.
STALE_LAUNCHER_ENV = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_PORT": "1"}


def _submit(cluster, tmp_path: Path, *args: str, command: list[str], env: dict | None = None) -> str:
    proc = cluster.run(*BIGBATCH, "submit", "--time", "10", "--chdir", str(REPO),
                       "--output", str(tmp_path / "slurm-%j.out"), *args, "--", *command,
                       env={**os.environ, **OFFLINE, **STALE_LAUNCHER_ENV, **(env or {})})
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout + proc.stderr
    return job_id


def _job_log(tmp_path: Path, job_id: str) -> str:
    p = tmp_path / f"slurm-{job_id}.out"
    return p.read_text(errors="replace") if p.exists() else "(no job output yet)"


def _wait_file(path: Path, cluster, job_id: str, tmp_path: Path, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise AssertionError(f"{path} not written after {timeout} s; job {job_id}: "
                                 f"{cluster.job_info(job_id)}\n{_job_log(tmp_path, job_id)}\n{cluster.logs()}")
        time.sleep(0.2)


def _release_if_requeued(cluster, job_id: str, timeout: float = 60) -> None:
    """Wait for the requeue, then start the job at once: SLURM holds a requeued job ~120 s
    (Reason=BeginTime). Released in the same second as the old run's kill, its new launch is
    refused ("Job credential revoked"), so wait for the nodes to finish completing and 2 s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = cluster.job_info(job_id)
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "RUNNING":
            return
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING":
            time.sleep(2.0)
            while cluster.run("sinfo", "-h", "-t", "completing", "-o", "%N").stdout.strip():
                assert time.monotonic() < end, "nodes still completing"
                time.sleep(0.2)
            cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            return
        assert info, f"job {job_id} ended instead of requeueing"
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} was not requeued: {cluster.job_info(job_id)}")

def _preempt_when_waiting(slurm_cluster, tmp_path, job: str) -> str:
    """USR1 to the batch script once the run waits at its step (``wait_at_step(tmp_path / "wait", N)``),
    then wait for the requeued job to end; its log."""
    _wait_file(tmp_path / "wait.reached", slurm_cluster, job, tmp_path, timeout=180)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    _release_if_requeued(slurm_cluster, job, timeout=120)
    slurm_cluster.wait_done(job, timeout=240)
    return _job_log(tmp_path, job)


def _ranks(out: Path, n: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]


# ---------------------------------------------------------------- launcher path (probe)


def test_launch_inside_allocation_two_nodes(slurm_cluster, tmp_path):
    """`bigbatch launch` in a batch script starts 2 workers per node with srun; every worker
    finds its place from SLURM's variables and a gloo all-reduce spans both nodes."""
    out = tmp_path / "probe"
    wrap = " ".join([*BIGBATCH, "launch", "--nproc-per-node", "2", PROBE, "--out", str(out), "--steps", "2"])
    proc = slurm_cluster.run("sbatch", "--parsable", "--wait", "-N2", "-n4", "--time=5", f"--chdir={REPO}",
                             f"--output={tmp_path}/slurm-%j.out", f"--wrap={wrap}", timeout=180)
    job_id = proc.stdout.strip().split(";")[0]
    ranks = _ranks(out, 4)
    log = _job_log(tmp_path, job_id)
    assert all(r["source"] == "slurm" for r in ranks), log
    assert [(r["rank"], r["local_rank"], r["node_rank"], r["hostname"]) for r in ranks] == [
        (0, 0, 0, "node1"), (1, 1, 0, "node1"), (2, 0, 1, "node2"), (3, 1, 1, "node2")]
    for r in ranks:
        assert (r["world_size"], r["local_world_size"], r["num_nodes"]) == (4, 2, 2)
        assert r["hosts"] == ["node1", "node2"] and r["master_addr"] == "node1"
        assert r["master_port"] == slurm_master_port(job_id)
        assert r["allreduce"] == 10.0  # 1 + 2 + 3 + 4 over both nodes
    assert "srun --wait=60 --ntasks-per-node=2" in log


def test_preempt_signal_checkpoint_requeue_finish(slurm_cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@N sends before the time limit): the
    workers checkpoint and exit 75, the job requeues itself, restarts and finishes; every
    step ran exactly once."""
    out = tmp_path / "probe"
    steps, at = 8, 3
    job = _submit(slurm_cluster, tmp_path, "--nodes", "2", "--ntasks-per-node", "2", "--signal-seconds", "30",
                  command=[PROBE, "--out", str(out), "--steps", str(steps), "--wait-at", str(at)])
    _wait_file(out / "waiting", slurm_cluster, job, tmp_path)  # every rank waits before step 3
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    _release_if_requeued(slurm_cluster, job)
    _wait_file(out / "done.json", slurm_cluster, job, tmp_path)
    slurm_cluster.wait_done(job)
    log = _job_log(tmp_path, job)
    ckpt = json.loads((out / "ckpt.json").read_text())
    assert ckpt["step"] == at, log
    assert f"probe: SIGUSR1: checkpoint at step {ckpt['step']}, exit 75" in log
    assert "[bigbatch] requeueing job" in log and f"[bigbatch] job {job} restart 1" in log
    assert f"start step {ckpt['step']}" in log
    assert [r["restart"] for r in _ranks(out, 4)] == [1, 1, 1, 1]
    steps_run = [int(line.split()[0]) for line in (out / "steps.log").read_text().splitlines()]
    assert steps_run == list(range(steps)), log


def test_cancel_does_not_requeue(slurm_cluster, tmp_path):
    """scancel sends TERM: the workers checkpoint, but a cancelled job must stay cancelled."""
    out = tmp_path / "probe"
    job = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--ntasks-per-node", "2",
                  command=[PROBE, "--out", str(out), "--steps", "8", "--wait-at", "3"])
    _wait_file(out / "waiting", slurm_cluster, job, tmp_path)  # waits for the signal: cannot finish first
    slurm_cluster.run("scancel", job)
    info = slurm_cluster.wait_done(job, timeout=60)
    assert info == {} or info["JobState"] == "CANCELLED", info
    time.sleep(1.0)
    info = slurm_cluster.job_info(job)
    assert info == {} or int(info.get("Restarts", "0")) == 0, info
    assert not (out / "done.json").exists()
    assert not (out / "running.1").exists()  # never restarted


def test_torchrun_template_two_nodes(slurm_cluster, tmp_path):
    """The torchrun-per-node template: c10d rendezvous on the first node, 2 workers per node."""
    out = tmp_path / "probe"
    job = _submit(slurm_cluster, tmp_path, "--template", "torchrun", "--nodes", "2", "--ntasks-per-node", "2",
                  command=[PROBE, "--out", str(out), "--steps", "2"])
    slurm_cluster.wait_done(job, timeout=180)
    log = _job_log(tmp_path, job)
    assert "workers exited with status 0" in log, log
    ranks = _ranks(out, 4)
    assert all(r["source"] == "torchrun" and r["world_size"] == 4 and r["allreduce"] == 10.0 for r in ranks), log
    assert sorted((r["node_rank"], r["hostname"]) for r in ranks) == [
        (0, "node1"), (0, "node1"), (1, "node2"), (1, "node2")] or \
        sorted((r["node_rank"], r["hostname"]) for r in ranks) == [
        (0, "node2"), (0, "node2"), (1, "node1"), (1, "node1")]


# ---------------------------------------------------------------- train.py end to end


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _train_steps(run: Path) -> list[int]:
    return [m["step"] for m in _metrics(run) if "loss" in m and "step" in m]


def test_train_two_nodes_preempt_requeue_then_resume_on_one_node(slurm_cluster, tmp_path):
    """train.py at 2 nodes x 2 ranks (one job: trains, writes metrics) gets USR1 mid-run,
    checkpoints, the job requeues itself and finishes with no step lost or repeated; a later run
    of the same directory on 1 node (2 ranks) resumes from the latest checkpoint and logs the
    batch and hyperparameters rescaled for the new world size. (One test, to pay train.py's
    start-up three times rather than five.)"""
    run = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, "--nodes", "2", "--ntasks-per-node", "2",
                  command=[FAULT_TRAIN, *TRAIN_TINY, "--batch.policy", "scale", "--batch.per_device_batch", "2",
                           "--train.max_steps", "24", "--resume", str(run)], env=wait_at_step(tmp_path / "wait", 5))
    log = _preempt_when_waiting(slurm_cluster, tmp_path, job)
    assert "signal received: checkpoint saved at step 5 " in log, log
    assert "[bigbatch] requeueing job" in log and f"[bigbatch] job {job} restart 1" in log, log
    assert "| 4 proc(s) |" in log and "global batch 8 = 2 x 1 accum x 4" in log, log
    steps = _train_steps(run)
    assert steps == list(range(1, 25)), (steps, log)  # each step logged once across the restart
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert all(0 < l < 20 for l in losses) and losses[-1] < losses[0], losses
    # Same directory, half the ranks: resume from the last checkpoint with a rescaled plan.
    job2 = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--ntasks-per-node", "2",
                   command=["train.py", "--resume", str(run), "--train.max_steps", "26"])
    slurm_cluster.wait_done(job2, timeout=240)
    log2 = _job_log(tmp_path, job2)
    assert "workers exited with status 0" in log2, log2
    # policy "scale": 2 ranks x 2 sequences = half the reference batch of 8, so kappa 0.5 and
    # the optimizer's hyperparameters are rescaled (lr no longer the configured 3e-3).
    assert "rescaled hyperparameters" in log2, log2
    assert "| 2 proc(s) |" in log2 and "global batch 4" in log2 and "(kappa 0.5)" in log2, log2
    assert " lr 0.003," not in log2, log2
    assert _train_steps(run) == list(range(1, 27)), log2


def test_train_out_survives_its_own_requeue(slurm_cluster, tmp_path):
    """`bigbatch submit -- train.py --config C --out D` (not --resume): USR1 mid-run, the job checkpoints,
    requeues itself, and the requeue continues D (as --resume D) to the end: every step logged once."""
    run = tmp_path / "run"
    job = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--ntasks-per-node", "2",
                  command=[FAULT_TRAIN, *TRAIN_TINY, "--train.max_steps", "16", "--out", str(run)],
                  env=wait_at_step(tmp_path / "wait", 3))
    log = _preempt_when_waiting(slurm_cluster, tmp_path, job)
    assert "[bigbatch] requeueing job" in log and f"[bigbatch] job {job} restart 1" in log, log
    assert "already holds a run" not in log and "workers exited with status 0" in log, log
    assert "signal received: checkpoint saved at step 3 " in log, log
    assert re.search(r"steps 3->16 ", log), log  # the requeue started from the checkpoint
    assert _train_steps(run) == list(range(1, 17)), log  # each step once across the requeue


def test_check_rules_submits_branches_and_a_report_job(slurm_cluster, tmp_path):
    """check-rules --submit: one real SLURM job per branch (1 node x 2 ranks each) and a report job
    that runs after the last; the report covers every branch with steps = tokens / batch."""
    out = tmp_path / "check"
    options = f"--time 10 --chdir {REPO} --output {tmp_path}/slurm-%j.out --nodes 1 --ntasks-per-node 2"
    proc = slurm_cluster.run(*BIGBATCH, "check-rules", *TRAIN_TINY, "--kappas", "1,2", "--tokens", "1024",
                             "--evals", "2", "--out", str(out), "--submit", options,
                             env={**os.environ, **OFFLINE}, timeout=120)
    jobs = [line.rsplit(" ", 1)[1] for line in proc.stdout.splitlines() if ": job " in line]
    report_job = next(line.split()[3] for line in proc.stdout.splitlines() if "report job" in line)
    assert len(jobs) == 3 and report_job.isdigit(), proc.stdout
    assert f"runs after {', '.join(jobs)}" in proc.stdout
    slurm_cluster.wait_done(report_job, timeout=300)
    report_path = out / "report.json"
    assert report_path.exists(), "\n".join(_job_log(tmp_path, j) for j in [*jobs, report_job])
    report = json.loads(report_path.read_text())
    by = {b["name"]: b for b in report["branches"]}
    assert set(by) == {"k1", "k1_seed2", "k2"}
    for b in by.values():
        assert b["steps"] * b["global_batch"] * 32 == 1024 and len(b["evals"]) == 3
    assert by["k2"]["verdict"] in ("holds", "breaks") and (out / "report.md").exists()
    assert "| 2 proc(s) |" in _job_log(tmp_path, jobs[2])

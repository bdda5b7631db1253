"""Scale-out: a run that moves to more nodes when its batch schedule outgrows the nodes in hand
(bigbatch.training.callbacks.scale_out, ``bigbatch submit --max-nodes``), and one requeued on fewer
nodes that continues there with the batch cut by the rules. The SLURM tests use the session's
two-node cluster (tests/conftest.py: slurm_cluster)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from bigbatch import exit_codes
from bigbatch import cli
from bigbatch.training.callbacks.scale_out import (ScaleOut, allowed_max_nodes, check_scale_out, fitting_plan,
                                                   largest_fitting, target_nodes)
from bigbatch.training.config import ConfigError, load_config
from test_slurm import TRAIN_TINY, _job_log, _metrics, _submit, _train_steps, _wait_file
from train_common import FAULT_TRAIN, PY, REPO, main, run, wait_at_step

SEQ = 32  # TRAIN_TINY's data.seq_len


def _cfg(*overrides: str):
    pairs = list(zip(overrides[::2], overrides[1::2]))
    return load_config(REPO / "configs" / "tiny.yaml", [(k.lstrip("-"), v) for k, v in pairs])


# ---------------------------------------------------------------- the policy's arithmetic


PROBE = "tests/dist_probe.py"


def test_target_and_limit_follow_the_accumulation_limit():
    """micro batch 2, at most 1 accumulation step: batch 8 needs 4 devices; 2 per node -> 2 nodes."""
    cfg = _cfg("--batch.micro_batch_sizes", "[2]", "--batch.reference_global_batch", "8",
               "--batch.schedule", "[[0,4],[1000,8],[2000,16]]", "--scale_out.max_nodes", "4")
    assert target_nodes(cfg, 8, 1, 2, 4) == 2
    assert target_nodes(cfg, 16, 1, 2, 4) == 4  # 3 nodes x 2 x 2 = 12 does not divide 16
    assert target_nodes(cfg, 16, 1, 2, 3) is None
    assert largest_fitting(cfg, [4, 8, 16], 1, 2, 16) == 4
    assert largest_fitting(cfg, [4, 8, 16], 2, 2, 16) == 8
    assert largest_fitting(cfg, [8, 16], 1, 2, 16) is None
    assert allowed_max_nodes(cfg, {"BIGBATCH_MAX_NODES": "2"}) == 2
    assert allowed_max_nodes(cfg, {}) == 4
    assert check_scale_out(cfg, 2, 2, fresh=True, environ={}) == 4  # 16 fits on 4 nodes
    with pytest.raises(ConfigError, match=r"scale_out.max_grad_accum: 1 .* global batch 16 on any of 1..2 nodes"):
        check_scale_out(cfg, 2, 2, fresh=True, environ={"BIGBATCH_MAX_NODES": "2"})
    # 2 nodes x 2: batch 4 is not formable; a resume builds the engine at 8, a fresh run is refused
    assert check_scale_out(cfg, 4, 2, fresh=False, environ={}) == 8
    with pytest.raises(ConfigError, match=r"batch.schedule: the first batch 4 on 4 devices: global_batch: 4 cannot"):
        check_scale_out(cfg, 4, 2, fresh=True, environ={})
    assert ScaleOut(cfg, environ={}).exit_code == exit_codes.SCALE_OUT == 76


def test_the_noise_scales_own_accumulation_and_margin_follow_the_schedule():
    """Measuring the noise scale on one process takes 2 micro batches a step (batch 16 as 8 x 2): that
    accumulation is the noise scale's, not the batch's, so the policy neither moves for it at step 1 nor
    refuses a schedule over it; its noise test is the automatic schedule's growth_margin by default."""
    from types import SimpleNamespace

    from bigbatch.training.builders import make_plan

    auto = ["--batch.schedule", "auto", "--batch.min_global_batch", "16", "--batch.max_global_batch", "64",
            "--scale_out.max_nodes", "2", "--scale_out.max_grad_accum", "1"]
    cfg = _cfg(*auto)
    plan = make_plan(cfg, 1, 16)
    assert (plan.micro_batch, plan.grad_accum) == (8, 2)  # the noise scale's accumulation
    assert fitting_plan(cfg, 16, 1, 1) is not None and target_nodes(cfg, 32, 1, 1, 2) == 2
    trainer = SimpleNamespace(plan=plan, batch_limit=None, done=lambda: False, info=SimpleNamespace(world_size=1))
    assert not ScaleOut(cfg, environ={})._outgrown(trainer)
    trainer.plan = make_plan(cfg, 1, 32)  # 16 x 2: the batch's own accumulation
    assert ScaleOut(cfg, environ={})._outgrown(trainer)
    assert cfg.scale_out.margin(cfg.batch) == cfg.batch.growth_margin == 0.75
    assert _cfg(*auto, "--scale_out.noise_margin", "1.5").scale_out.margin(cfg.batch) == 1.5
    fixed = _cfg("--batch.schedule", "[[0,16],[1000,32]]", "--scale_out.max_nodes", "2")
    assert fixed.scale_out.margin(fixed.batch) == 1.0


def test_bad_scale_out_input_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    """Refused before any work or file: a policy without a schedule; a per-device batch that cannot
    form a schedule batch on any allowed node count."""
    monkeypatch.chdir(REPO)
    out = tmp_path / "x"
    base = [*TRAIN_TINY, "--out", str(out)]
    assert main([*base, "--scale_out.max_nodes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: scale_out.max_nodes: 2 needs batch.schedule"), err
    assert main([*base, "--scale_out.max_nodes", "2", "--batch.schedule", "[[0,2],[512,64]]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert ("error: scale_out.max_grad_accum: 1 micro batches of batch.micro_batch_sizes [2] per device cannot form the "
            "schedule's global batch 64 on any of 1..2 nodes x 1 devices") in err[0]
    assert not out.exists()


def test_submit_max_nodes_checks_and_script(capsys):
    # a command that is not train.py: submit checks a train.py command line as train.py would
    assert cli.main(["submit", "--dry-run", "--nodes", "2", "--max-nodes", "1", "--", PROBE]) == 2
    assert capsys.readouterr().err.strip() == ("bigbatch submit: --max-nodes: 1 is below --nodes 2; give a node "
                                               "count >= --nodes (the largest allocation the run may move to)")
    assert cli.main(["submit", "--dry-run", "--template", "torchrun", "--nodes", "1", "--max-nodes", "2", "--",
                     PROBE]) == 2
    assert "--max-nodes: 2 needs --template srun" in capsys.readouterr().err
    assert cli.main(["submit", "--dry-run", "--nodes", "1", "--max-nodes", "2", "--", PROBE]) == 0
    script = capsys.readouterr().out
    assert "export BIGBATCH_MAX_NODES=2" in script and f'[ "$rc" = {exit_codes.SCALE_OUT} ]' in script
    assert 'BIGBATCH_CONTINUES=1 sbatch --parsable --nodes="$next" --dependency=afterany:"$SLURM_JOB_ID" "$0"' in script
    assert cli.main(["submit", "--dry-run", "--nodes", "1", "--", PROBE]) == 0
    assert "BIGBATCH_MAX_NODES" not in capsys.readouterr().out


# ---------------------------------------------------------------- real SLURM jobs

# 10 steps at 4 sequences (2 ranks x 2, no accumulation), then 8 sequences: 2 accumulation steps on
# one node, over scale_out.max_grad_accum 1, so the run moves to 2 nodes (4 ranks x 2) for 10 more.
SCHEDULE = ["--batch.schedule", "[[0,4],[1280,8]]", "--train.tokens", "3840", "--train.noise_scale_every", "1"]
POLICY = ["--scale_out.max_nodes", "2", "--scale_out.noise_margin", "0.25"]


def _wait_gone(cluster, job: str, tmp_path: Path, timeout: float = 300) -> str:
    cluster.wait_done(job, timeout=timeout)
    return _job_log(tmp_path, job)


def _kinds(run: Path, kind: str) -> list[dict]:
    return [m for m in _metrics(run) if m.get("kind") == kind]


@pytest.mark.slow
def test_scale_out_moves_to_two_nodes_with_the_same_losses(slurm_cluster, tmp_path):
    """Submitted on 1 node with --max-nodes 2: at the schedule's batch 8 the run checkpoints, exits
    76, its script submits the same command on 2 nodes, which resumes and finishes; every step is
    logged once and the losses equal those of a run that stayed on 1 node at the same batches."""
    run, ref = tmp_path / "scaled", tmp_path / "ref"
    job = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--max-nodes", "2", "--ntasks-per-node", "2",
                  command=["train.py", *TRAIN_TINY, *SCHEDULE, *POLICY, "--resume", str(run)])
    ref_job = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--ntasks-per-node", "2",
                      command=["train.py", *TRAIN_TINY, *SCHEDULE, "--out", str(ref)])
    log = _wait_gone(slurm_cluster, job, tmp_path)
    assert "workers exited with status 76" in log, log
    line = next((x for x in log.splitlines() if "[bigbatch] scale-out: job" in x), None)
    assert line is not None and f"continues on 2 nodes after job {job}" in line, log
    new_job = line.split("job ")[1].split()[0]
    log2 = _wait_gone(slurm_cluster, new_job, tmp_path)
    ref_log = _wait_gone(slurm_cluster, ref_job, tmp_path)
    assert "workers exited with status 0" in log2 and "| 4 proc(s) |" in log2, log2
    assert "workers exited with status 0" in ref_log, ref_log
    assert "--resume: nodes 1 -> 2 (scale out) at step 10" in log2, log2

    assert _train_steps(run) == list(range(1, 21)), (log, log2)
    [rec] = _kinds(run, "scale_out")
    assert (rec["step"], rec["tokens"], rec["nodes_from"], rec["nodes_to"], rec["global_batch"],
            rec["grad_accum"]) == (10, 1280, 1, 2, 8, 2), rec
    assert rec["noise_scale"] >= 0.25 * 8, rec
    [moved] = _kinds(run, "nodes_change")
    assert (moved["reason"], moved["nodes_from"], moved["nodes"], moved["world_size"], moved["global_batch"],
            moved["grad_accum"]) == ("scale_out", 1, 2, 4, 8, 1), moved
    train = [m for m in _metrics(run) if m.get("kind") == "train"]
    ref_train = [m for m in _metrics(ref) if m.get("kind") == "train"]
    assert [m["step"] for m in ref_train] == list(range(1, 21)), ref_log
    assert [m["global_batch"] for m in train] == [m["global_batch"] for m in ref_train] == [4] * 10 + [8] * 10
    for a, b in zip(train, ref_train):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a["step"], a["loss"], b["loss"])
        assert math.isclose(a["lr"], b["lr"], rel_tol=1e-9), (a["step"], a["lr"], b["lr"])


def _requeue_smaller(cluster, job: str, nodes: int, tasks: int, timeout: float = 120) -> None:
    """Wait for the self-requeue, shrink the pending job to ``nodes`` (a node lost), start it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = cluster.job_info(job)
        assert info, f"job {job} ended instead of requeueing"
        if int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING":
            time.sleep(2.0)
            while cluster.run("sinfo", "-h", "-t", "completing", "-o", "%N").stdout.strip():
                assert time.monotonic() < end, "nodes still completing"
                time.sleep(0.2)
            # the task and CPU counts first: NumNodes alone lowers only the minimum (SLURM 22.05)
            cluster.run("scontrol", "update", f"JobId={job}", f"NumTasks={tasks}", f"NumCPUs={tasks}",
                        f"NumNodes={nodes}-{nodes}")
            cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            return
        time.sleep(0.2)
    raise AssertionError(f"job {job} was not requeued: {cluster.job_info(job)}")


@pytest.mark.slow
def test_requeue_on_fewer_nodes_cuts_the_batch_by_the_rules(slurm_cluster, tmp_path):
    """A 2-node run at batch 8 (no accumulation) is preempted and requeued on 1 node (a node lost):
    it continues there at the schedule's batch 4 (no accumulation beyond the limit), the rules
    applied downwards, says so in a nodes_change record, and finishes with every step once."""
    run = tmp_path / "run"
    # 4 steps at batch 4, then 12 at 8; preempted after step 8 (the run waits there for the signal)
    schedule = ["--batch.schedule", "[[0,4],[512,8]]", "--batch.micro_batch_sizes", "[2,1]",
                "--train.tokens", str(512 + 12 * 8 * SEQ)]
    job = _submit(slurm_cluster, tmp_path, "--nodes", "2", "--max-nodes", "2", "--ntasks-per-node", "2",
                  command=[FAULT_TRAIN, *TRAIN_TINY, *schedule, "--scale_out.max_nodes", "2",
                           "--scale_out.noise_margin", "0", "--checkpoint.keep", "1", "--resume", str(run)],
                  env=wait_at_step(tmp_path / "wait", 8))
    _wait_file(tmp_path / "wait.reached", slurm_cluster, job, tmp_path, timeout=240)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    _requeue_smaller(slurm_cluster, job, nodes=1, tasks=2)
    log = _wait_gone(slurm_cluster, job, tmp_path, timeout=400)
    assert "[bigbatch] requeueing job" in log and f"[bigbatch] job {job} restart 1" in log, log
    assert "workers exited with status 0" in log, log
    [lost] = _kinds(run, "nodes_change")
    assert (lost["reason"], lost["nodes_from"], lost["nodes"], lost["world_size"], lost["global_batch"],
            lost["grad_accum"], lost["batch_limit"]) == ("nodes_lost", 2, 1, 2, 4, 1, 4), lost
    [change] = [c for c in _kinds(run, "batch_change") if c["reason"] == "resume"]
    assert (change["old_global_batch"], change["global_batch"], change["kappa_change"]) == (8, 4, 0.5), change
    assert lost["step"] == 8 and change["step"] == 8 and change["lr_peak"] < max(c["lr_peak"] for c in _kinds(run, "batch_change"))
    assert not _kinds(run, "scale_out")
    steps = _train_steps(run)
    assert steps == list(range(1, len(steps) + 1)), log
    train = [m for m in _metrics(run) if m.get("kind") == "train"]
    assert {m["global_batch"] for m in train if m["step"] > lost["step"]} == {4}, log
    assert steps[-1] == 8 + 16 and train[-1]["tokens"] == 512 + 12 * 8 * SEQ  # 8 steps left at 8: 16 at 4
    assert "--resume: nodes 2 -> 1 (nodes lost)" in log and "the batch stays at most 4 on these nodes" in log, log


@pytest.mark.slow
def test_the_noise_scale_holds_the_move_back(tmp_path, capsys, monkeypatch):
    """One process (1 node x 1 device), batch 2 then 4 (4 accumulation steps here, over the limit 2):
    with B_noise far below noise_margin x 4 the run stays and says why once; with noise_margin 0 it
    saves, logs a scale_out record to 2 nodes and exits 76."""
    monkeypatch.chdir(REPO)
    base = [*TRAIN_TINY, "--batch.micro_batch_sizes", "[1]", "--batch.schedule", f"[[0,2],[{4 * SEQ * 2}, 4]]",
            "--train.noise_scale_every", "1", "--train.tokens", str(8 * SEQ * 2), "--scale_out.max_nodes", "2",
            "--scale_out.max_grad_accum", "2"]
    held, moved = tmp_path / "held", tmp_path / "moved"
    assert main([*base, "--scale_out.noise_margin", "1000", "--out", str(held)]) == 0
    out = capsys.readouterr().out
    assert out.count("scale-out waits at step 4: global batch 4 needs 4 accum here, 2 nodes would take it") == 1, out
    assert not _kinds(held, "scale_out") and _train_steps(held) == list(range(1, 7))
    # a second engine in this process is not possible (DeepSpeed keeps its groups): a process of its own
    proc = run([PY, "train.py", *base, "--scale_out.noise_margin", "0", "--out", str(moved)])
    assert proc.returncode == exit_codes.SCALE_OUT, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "exiting with code 76 to continue on 2 nodes" in proc.stdout
    [rec] = _kinds(moved, "scale_out")
    assert (rec["step"], rec["nodes_from"], rec["nodes_to"], rec["global_batch"], rec["grad_accum"]) == (4, 1, 2, 4, 4)
    assert _train_steps(moved) == [1, 2, 3, 4] and (moved / "checkpoints").is_dir()

"""train.py end to end: real DeepSpeed engines, real gloo process groups (torchrun), real signals.

Sizes are tiny (a 32-wide Llama, 512-token BPE on pydoc text) so that every launch is dominated by
imports; the processes launched are: one single-process reference run, one 2-process run, one
run stopped by SIGTERM and its 2-process resume. Bad inputs run in-process through ``main``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

from train_common import (EVAL_KEYS, FAULT_TRAIN, PLOT, PY, REPO, TORCHRUN, TRAIN_KEYS, check_ok, env, free_port, main,
                          records, run, small_args, wait_at_step, wait_reached)

REF_STEPS = 100


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """One uninterrupted single-process run of REF_STEPS steps (micro 4 x 2 accumulation)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = run([PY, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), *small_args(cache),
                "--train.max_steps", str(REF_STEPS), *PLOT])
    check_ok(proc)
    return out


@pytest.mark.slow
def test_single_process_outputs_and_learning(reference):
    out = reference
    train, evals = records(out), records(out, "eval")
    assert [r["step"] for r in train] == list(range(1, REF_STEPS + 1))
    for r in train:
        assert TRAIN_KEYS <= set(r), sorted(TRAIN_KEYS - set(r))
        assert r["tokens"] == r["samples"] * 64 == r["step"] * 8 * 64
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
    assert all(EVAL_KEYS <= set(r) for r in evals) and [r["step"] for r in evals] == list(range(5, REF_STEPS + 1, 5))
    assert evals[-1]["eval_ppl"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    # loss falls: ln(512) ~ 6.2 at init; the last steps and the held-out loss are well below
    first = sum(r["loss"] for r in train[:3]) / 3
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert first > 6.0 and last < first - 1.0, (first, last)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    # cosine schedule in tokens: lr decreasing after (no) warmup, from the reference lr
    assert train[0]["lr"] == pytest.approx(1e-2, rel=1e-3) and train[-1]["lr"] < train[0]["lr"]
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["resolved"]["plan"]["grad_accum"] == 2 and resolved["resolved"]["world_size"] == 1
    assert resolved["model"]["hidden_size"] == 32
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert any(p.name.startswith("events.") for p in (out / "tensorboard").iterdir())
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{REF_STEPS:08d}"


@pytest.mark.slow
def test_two_gloo_processes_match_one(reference, tmp_path, cache):
    out = tmp_path / "run2"
    port = free_port()  # a known rendezvous port: it names this run's shared-memory files, not another test's
    proc = run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "train.py",
                "--config", "configs/tiny.yaml", "--out", str(out), *small_args(cache), "--train.max_steps", "12",
                "--train.noise_scale_every", "1", *PLOT])
    check_ok(proc)
    # DeepSpeed's CPU shared-memory all-reduce would leave a ~69 MB /dev/shm file per process behind
    # (deepspeed_allreduce_buffer_<uid>_<master addr>_<master port>_<rank>)
    assert not list(Path("/dev/shm").glob(f"deepspeed_*_{port}_*"))
    assert "final eval: loss" in proc.stdout and "perplexity" in proc.stdout
    assert f"loss curves: {out / 'loss.png'}" in proc.stdout
    ref = {r["step"]: r for r in records(reference)}
    two = records(out)
    assert [r["step"] for r in two] == list(range(1, 13))
    for r in two:  # same global batch (4 x 1 x 2 vs 4 x 2 x 1): same losses up to fp32 summation order
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-5, abs=1e-6)
        assert r["grad_norm"] == pytest.approx(ref[r["step"]]["grad_norm"], rel=1e-4)
    # gradient noise scale from per-rank micro-batch grads vs the reduced one (probe hooks do not
    # change the gradients: the losses above equal the run without them)
    noise = [r["noise_scale"] for r in two if "noise_scale" in r]
    assert len(noise) >= 10 and all(0 < b < 1e4 for b in noise), noise
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())["resolved"]
    assert resolved["world_size"] == 2 and resolved["plan"]["grad_accum"] == 1


@pytest.mark.slow
def test_sigterm_saves_and_resume_on_two_processes_continues_exactly(reference, tmp_path, cache):
    out = tmp_path / "preempted"
    # the command a requeued SLURM job repeats: --resume on a directory with no checkpoint starts at 0
    # (tests/fault/train.py: train.py that waits after step 3 until the signal arrived)
    cmd = [PY, FAULT_TRAIN, "--config", "configs/tiny.yaml", "--resume", str(out), *small_args(cache),
           "--train.max_steps", "1000"]
    wait = tmp_path / "wait"
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env(), **wait_at_step(wait, 3)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_reached(proc, wait)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, f"exit {proc.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    stopped = records(out)[-1]["step"]
    assert stopped == 3, stopped
    assert "no complete checkpoint" in stdout and records(out)[0]["step"] == 1
    assert f"checkpoint saved at step {stopped}" in stdout
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{stopped:08d}"

    # a fresh start into the same directory is refused; --resume continues on 2 processes
    refused = run([PY, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), *small_args(cache)])
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    proc = run(TORCHRUN + ["train.py", "--resume", str(out), "--train.max_steps", str(stopped + 4)])
    check_ok(proc)
    ref = {r["step"]: r for r in records(reference)}
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, stopped + 5))  # no gaps, no repeats
    for r in got:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-5, abs=1e-6), r["step"]
        assert r["lr"] == pytest.approx(ref[r["step"]]["lr"], rel=1e-9)
        assert r["samples"] == ref[r["step"]]["samples"]


@pytest.mark.slow
def test_optimizer_named_by_class_path(tmp_path, cache):
    """Any optimizer the registry resolves runs in train.py: built by bigbatch, scaled by its rule."""
    out = tmp_path / "adamw"
    proc = run([PY, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), *small_args(cache),
                "--optim.name", "torch.optim.AdamW", "--optim.hparams", "{lr: 1e-2, betas: [0.9, 0.95], weight_decay: 0.1}",
                "--optim.kwargs", "{foreach: true}", "--batch.policy", "scale", "--batch.per_device_batch", "16",
                "--train.max_steps", "3"])
    check_ok(proc)
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())["resolved"]
    assert resolved["plan"]["optimizer"] == "adamw" and resolved["plan"]["kappa"] == 2.0
    first = records(out)[0]
    assert first["weight_decay"] == pytest.approx(0.1 * 2**0.5) and first["beta2"] == pytest.approx(0.9)
    assert first["lr"] == pytest.approx(1e-2 * 2**0.5, rel=1e-3)  # cosine: just below the peak after step 1


# ------------------------------------------------------------------ bad input, in-process


def test_bad_inputs_exit_2_and_touch_nothing(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = ["--config", "configs/tiny.yaml", *small_args(cache)]

    assert main([*base, "--out", str(tmp_path / "a"), "--model.hiden_size", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'model.hiden_size'" in err and "'hidden_size'" in err
    assert not (tmp_path / "a").exists()

    assert main(["--config", "configs/nope.yaml", "--out", str(tmp_path / "b")]) == 2
    assert "configs/nope.yaml' does not exist" in capsys.readouterr().err

    assert main(["--config", "configs/tiny.yaml"]) == 2
    assert "--out: required" in capsys.readouterr().err

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "metrics.jsonl").write_text("keep me\n")
    assert main([*base, "--out", str(existing)]) == 2
    assert "pass --resume DIR to continue it or --overwrite" in capsys.readouterr().err
    assert (existing / "metrics.jsonl").read_text() == "keep me\n"

    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "has no config.resolved.yaml" in capsys.readouterr().err

    tiny_text = tmp_path / "tiny.txt"
    tiny_text.write_text("too short\n")
    assert main([*base, "--out", str(tmp_path / "c"), "--data.source", "text", "--data.files", str(tiny_text)]) == 2
    assert "fewer than 128 needed for one training and one validation block" in capsys.readouterr().err
    assert not (tmp_path / "c" / "metrics.jsonl").exists()

    assert main([*base, "--out", str(tmp_path / "e"), "--optim.hparams.momentum", "0.9"]) == 2
    assert "optim.hparams: 'momentum' is not an argument of AdaBound" in capsys.readouterr().err

    # a global batch that no micro batch reaches on 1 process
    assert main([*base, "--out", str(tmp_path / "d"), "--batch.reference_global_batch", "6",
                 "--batch.micro_batch_sizes", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: batch:") and "6" in err
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


def test_sigusr1_and_sigterm_set_the_stop_flag():
    from bigbatch.training.callbacks import Preemption

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            flag = Preemption(75)
            assert flag.signum is None
            os.kill(os.getpid(), sig)  # a real signal, delivered to this process
            assert flag.signum == sig
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_grad_norm_spike_alarm_flags_exactly_the_spikes(tmp_path, cache):
    """``train.grad_spike_factor``: a grad_spike record (and a warning) at every step whose gradient
    norm exceeds the factor x the bias-corrected moving average of the earlier non-spike norms, after 20
    steps, and at no other step; recomputed here from the per-step train records."""
    out = tmp_path / "spike"
    factor = 1.1
    proc = run([PY, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), *small_args(cache),
                "--train.max_steps", "60", "--train.grad_spike_factor", str(factor)])
    check_ok(proc)
    norms = [r["grad_norm"] for r in records(out)]
    assert len(norms) == 60
    mean, seen, want = 0.0, 0, []
    for step, g in enumerate(norms, start=1):
        avg = mean / (1 - 0.98**seen) if seen else 0.0
        if seen >= 20 and g > factor * avg:
            want.append(step)
            continue
        mean, seen = 0.98 * mean + 0.02 * g, seen + 1
    spikes = records(out, "grad_spike")
    assert [r["step"] for r in spikes] == want and want, (want, norms)
    for r in spikes:
        assert r["grad_norm"] > factor * r["grad_norm_ema"]
    assert proc.stdout.count("x its moving average") == len(want)


def test_resume_truncates_metrics_cut_short_by_a_kill(tmp_path):
    """A kill can leave half a line at the end of metrics.jsonl: the resume's truncation skips it."""
    from bigbatch.training.metrics import read_metrics, truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "step": 2}\n{"kind": "train", "st')
    truncate_metrics(str(path), 1)
    assert read_metrics(str(path)) == [{"kind": "train", "step": 1}]

"""Helpers for the tests that launch train.py: tiny sizes, the launch, the metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# train.py with the test-only fault hooks (tests/fault/fault_hooks.py: BIGBATCH_TEST_* variables)
FAULT_TRAIN = "tests/fault/train.py"
TRAIN_KEYS = {"kind", "step", "samples", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "beta1", "beta2",
              "final_lr", "gamma", "eps", "weight_decay"}
EVAL_KEYS = {"kind", "step", "samples", "tokens", "eval_loss", "eval_ppl"}


def small_args(cache: str) -> list[str]:
    return ["--data.cache_dir", cache, "--data.embedded", "pydoc", "--data.max_chars", "300000",
            "--tokenizer.vocab_size", "512", "--data.seq_len", "64", "--model.hidden_size", "32",
            "--model.intermediate_size", "64", "--model.num_heads", "2", "--train.log_every", "1",
            "--train.eval_every", "5", "--train.eval_blocks", "16", "--batch.reference_global_batch", "8",
            "--batch.micro_batch_sizes", "4", "--train.tokens", "200000", "--schedule.warmup_tokens", "0",
            "--optim.hparams.lr", "1e-2", "--optim.hparams.final_lr", "0.1", "--train.threads", "1",
            "--logging.progress", "lines", "--logging.plot", "false"]
# the plot (~1 s of matplotlib at each run's end) is drawn only by the runs whose tests look at it
PLOT = ["--logging.plot", "true"]


# what a launcher (or an in-process train.main) exports; a launched test process must find its own
_TOPOLOGY_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE",
                  "BIGBATCH_LAUNCH_SOURCE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    base = {k: v for k, v in os.environ.items() if k not in _TOPOLOGY_VARS}
    return {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    return proc


def records(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def main(argv: list[str]) -> int:
    """train.py's main in this process (bad inputs: they fail before any engine starts)."""
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    saved = dict(os.environ)
    try:
        return train.main(argv)
    finally:  # train.main exports the topology (MASTER_PORT, ...); later launches must not inherit it
        os.environ.clear()
        os.environ.update(saved)


def wait_at_step(wait: Path, step: int) -> dict:
    """The environment of a FAULT_TRAIN run that waits after ``step`` until a signal arrives (or the
    file ``wait`` exists); it writes ``wait.reached`` once every rank waits."""
    return {"BIGBATCH_TEST_WAIT_AT_STEP": str(step), "BIGBATCH_TEST_WAIT_FILE": str(wait)}


def wait_reached(proc: subprocess.Popen, wait: Path, timeout: float = 180) -> None:
    """Until the run ``proc`` waits at its fault point (``wait.reached``); fails if it ends first."""
    reached = Path(f"{wait}.reached")
    deadline = time.monotonic() + timeout
    while not reached.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its fault point:\n"
                                 f"{(out or '')[-2000:]}\n{(err or '')[-4000:]}")
        assert time.monotonic() < deadline, f"{reached} not written in {timeout} s"
        time.sleep(0.05)

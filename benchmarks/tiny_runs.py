"""train.py runs of the tiny config for the benchmarks that compare whole trainings: one launch per
run under torchrun, the run's metrics back as records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Adam-family hyperparameters the tiny-config benchmarks give AdamW and RAdam (AdaBound's lr and betas)
ADAM_HPARAMS = "{lr: 3.0e-3, betas: [0.9, 0.99], eps: 1.0e-8, weight_decay: 0.0}"


def launch(args: list[str], nproc: int, *, module: str | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``torchrun --nproc_per_node nproc`` of train.py (or ``-m module``) with ``args``; (process, seconds)."""
    target = ["-m", module] if module else ["train.py"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target,
           *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, **OFFLINE}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return proc, seconds


def read_records(path: Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_train(out: Path, args: list[str], nproc: int, threads: int | None = None, *,
              config: str = "configs/tiny.yaml", overwrite: bool = True) -> tuple[list[dict], float]:
    """One train.py run of ``config`` into ``out``: (its metrics records, wall seconds)."""
    base = ["--config", config, "--out", str(out), *(["--overwrite"] if overwrite else []),
            "--logging.progress", "none", "--logging.tensorboard", "false",
            *(["--train.threads", str(threads)] if threads else [])]
    _, seconds = launch(base + list(args), nproc)
    return read_records(Path(out) / "metrics.jsonl"), seconds

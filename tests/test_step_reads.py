"""A training step reads nothing from the device and starts no collective of bigbatch's own.

2-process runs of train.py (tests/count_reads.py wraps torch's value reads and torch.distributed's
collectives and counts the calls made from bigbatch/) with the gradient noise scale measured on every
step (2 micro batches a step: 2 ranks), logging every 20 steps. The counts between the starts of steps
20 and 60 are divided by the 40 steps: what a step costs on a GPU, where every read waits for the
device's queue to drain and every collective is a round trip.
"""

from __future__ import annotations

import json

import pytest

from train_common import TORCHRUN, check_ok, records, run, small_args

STEPS = 40  # between the two snapshots (tests/count_reads.py FIRST, LAST)


def _per_step(out, rank: int) -> tuple[float, float, dict]:
    seen = json.loads((out / f"reads_rank{rank}.json").read_text())
    first, last = seen["20"], seen["60"]
    where = {k: v - first["where"].get(k, 0) for k, v in last["where"].items() if v != first["where"].get(k, 0)}
    return ((last["reads"] - first["reads"]) / STEPS, (last["collectives"] - first["collectives"]) / STEPS, where)


def _counted_run(tmp_path, cache, name: str, extra: list[str]):
    out = tmp_path / name
    proc = run(TORCHRUN + ["tests/count_reads.py", "--config", "configs/tiny.yaml", "--out", str(out),
                           *small_args(cache), "--train.max_steps", "64", "--train.log_every", "20",
                           "--train.eval_every", "0", "--train.noise_scale_every", "1",
                           "--checkpoint.signal_every_steps", "20", *extra], timeout=600)
    check_ok(proc)
    assert all("noise_scale" in r for r in records(out)), "the noise scale was not measured"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine, extra", [
    ("deepspeed", []),
    ("fsdp2", ["--train.engine", "fsdp2"]),
    # torch's fused AdamW skips a non-finite step on the device too (found_inf, as from a GradScaler)
    ("fsdp2", ["--train.engine", "fsdp2", "--optim.name", "adamw", "--optim.kwargs", "{fused: true}",
               "--optim.hparams", "{lr: 0.01, betas: [0.9, 0.99], eps: 1.0e-8, weight_decay: 0.0}"]),
], ids=["deepspeed-adabound", "fsdp2-adabound", "fsdp2-fused-adamw"])
def test_a_step_reads_nothing(tmp_path, cache, engine, extra):
    out = _counted_run(tmp_path, cache, engine, extra)
    for rank in (0, 1):
        reads, collectives, where = _per_step(out, rank)
        assert reads <= 0.15, (rank, reads, where)
        assert collectives <= 0.1, (rank, collectives, where)

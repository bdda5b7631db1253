"""Resuming a run on another engine: DeepSpeed ZeRO-2 on 2 processes -> FSDP2 on 1 -> DeepSpeed ZeRO-3
on 2, and DeepSpeed -> DDP -> DeepSpeed, AMSBound, against the uninterrupted DeepSpeed run; the by-name
reader of every engine's tags.

Tolerance 1e-5 relative on the losses: the engines sum the same numbers in another order (a few ulps
per step, as in tests/test_fsdp2.py); a lost state (``max_exp_avg_sq``, a step counter, AdaBound's
``base_lr``) moves the loss by >= 1e-4 within a few steps.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from bigbatch.sharding.full_state import read_full_state
from train_common import PY, TORCHRUN, check_ok, records, run, small_args

pytestmark = pytest.mark.slow  # real process groups

STEPS = 30


def args(cache: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", *small_args(cache), "--train.eval_every", "0",
            "--optim.name", "amsbound", "--deepspeed.zero_stage", "2", "--checkpoint.every_steps", "10",
            "--checkpoint.keep", "5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("ds") / "run"
    check_ok(run(TORCHRUN + ["train.py", *args(cache), "--out", str(out), "--train.max_steps", str(STEPS)]))
    return out


def _from(src, dst, step: int):
    """A copy of run ``src`` that resumes from its tag at ``step``."""
    shutil.copytree(src, dst)
    for tag in (dst / "checkpoints").iterdir():
        if tag.is_dir() and int(tag.name[4:]) > step:
            shutil.rmtree(tag)
    (dst / "checkpoints" / "latest").write_text(f"step{step:08d}")
    return dst


def test_deepspeed_to_fsdp2_to_deepspeed_continues_the_run(uninterrupted, tmp_path):
    full = {r["step"]: r for r in records(uninterrupted)}
    out = _from(uninterrupted, tmp_path / "run", 10)
    check_ok(run([PY, "train.py", "--resume", str(out), "--train.engine", "fsdp2", "--train.max_steps", "20"]))
    fsdp = read_full_state(str(out / "checkpoints"), "step00000020")
    assert fsdp.engine == "fsdp2" and fsdp.meta["engine"] == "fsdp2"
    ds = read_full_state(str(uninterrupted / "checkpoints"), "step00000020")
    assert ds.engine == "deepspeed"
    # the state crossed whole: every moment (AMSBound's max included), steps and hyperparameters
    assert set(fsdp.params) == set(ds.params)
    for name in ds.params:
        assert set(fsdp.optim[name]) == set(ds.optim[name]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        assert fsdp.steps_by_name[name] == ds.steps_by_name[name] == 20.0
        assert torch.allclose(fsdp.params[name], ds.params[name], rtol=1e-4, atol=1e-6), name
        assert torch.allclose(fsdp.optim[name]["max_exp_avg_sq"], ds.optim[name]["max_exp_avg_sq"],
                              rtol=1e-3, atol=1e-12), name
    for g_f, g_d in zip(fsdp.groups, ds.groups):
        assert g_f["hparams"]["base_lr"] == g_d["hparams"]["base_lr"]
        assert g_f["hparams"]["amsbound"] and g_f["hparams"]["lr"] == pytest.approx(g_d["hparams"]["lr"], rel=1e-6)
    check_ok(run(TORCHRUN + ["train.py", "--resume", str(out), "--train.engine", "deepspeed",
                             "--deepspeed.zero_stage", "3", "--train.max_steps", str(STEPS)]))
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r in got[10:]:
        assert r["loss"] == pytest.approx(full[r["step"]]["loss"], rel=1e-5), r["step"]
    resolved = (out / "config.resolved.yaml").read_text()
    assert "zero_stage: 3" in resolved


def test_another_optimizer_is_refused_with_one_line(uninterrupted, tmp_path):
    out = _from(uninterrupted, tmp_path / "run", 10)
    proc = run([PY, "train.py", "--resume", str(out), "--train.engine", "fsdp2", "--optim.name", "adabound",
                "--train.max_steps", "12"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --resume: train.engine=fsdp2") and "adabound" in line and "amsbound" in line, line
    assert "Traceback" not in proc.stderr


def test_ddp_equals_zero0_and_resumes_to_and_from_the_other_engines(uninterrupted, tmp_path, cache):
    """``train.engine: ddp`` (plain DistributedDataParallel) on 2 processes takes the same steps as
    DeepSpeed ZeRO-0 (and so ZeRO-2); its DCP tags and DeepSpeed's cross both ways: DeepSpeed's tag at 10
    -> DDP on 2 to 20 -> DeepSpeed ZeRO-1 on 1 to 30, the uninterrupted run's losses throughout."""
    full = {r["step"]: r for r in records(uninterrupted)}
    zero0 = tmp_path / "zero0"
    check_ok(run(TORCHRUN + ["train.py", *args(cache), "--out", str(zero0), "--deepspeed.zero_stage", "0",
                             "--train.max_steps", "10", "--checkpoint.every_steps", "0"]))
    ddp = tmp_path / "ddp"
    check_ok(run(TORCHRUN + ["train.py", *args(cache), "--out", str(ddp), "--train.engine", "ddp",
                             "--train.max_steps", "10", "--checkpoint.every_steps", "0"]))
    for a, b in zip(records(ddp), records(zero0), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["noise_scale"] == pytest.approx(b["noise_scale"])
    tag = read_full_state(str(ddp / "checkpoints"), "step00000010")
    assert tag.engine == "ddp" and set(tag.optim[next(iter(tag.params))]) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    out = _from(uninterrupted, tmp_path / "run", 10)
    check_ok(run(TORCHRUN + ["train.py", "--resume", str(out), "--train.engine", "ddp", "--train.max_steps", "20"]))
    assert read_full_state(str(out / "checkpoints"), "step00000020").engine == "ddp"
    check_ok(run([PY, "train.py", "--resume", str(out), "--train.engine", "deepspeed", "--deepspeed.zero_stage", "1",
                  "--train.max_steps", str(STEPS)]))
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r in got[10:]:
        assert r["loss"] == pytest.approx(full[r["step"]]["loss"], rel=1e-5), r["step"]

"""Sample-based schedules: shapes, LambdaLR use, batch changes and step conversion."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from bigbatch.scaling import SampleSchedule, scale_steps


def test_shapes():
    cos = SampleSchedule(warmup=100, total=1100, decay="cosine", min_ratio=0.1)
    assert cos.factor(0) == 0 and cos.factor(50) == pytest.approx(0.5) and cos.factor(100) == pytest.approx(1)
    assert cos.factor(600) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos.factor(1100) == pytest.approx(0.1) and cos.factor(5000) == pytest.approx(0.1)
    lin = SampleSchedule(warmup=100, total=1100, decay="linear")
    assert lin.factor(350) == pytest.approx(0.75) and lin.factor(1100) == 0
    const = SampleSchedule(warmup=10, total=20, decay="constant")
    assert const.factor(5) == 0.5 and const.factor(15) == 1 and const.factor(100) == 1
    wsd = SampleSchedule(warmup=100, total=1000, decay="wsd", decay_length=200, min_ratio=0.0, unit="tokens")
    assert wsd.factor(799) == 1 and wsd.factor(900) == pytest.approx(0.5) and wsd.factor(1000) == 0


def _lrs(schedule: SampleSchedule, batch: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = LambdaLR(opt, schedule.lr_lambda(batch))
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])  # lr used by this step
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear", "wsd"])
def test_batch_change_changes_steps_only(decay):
    sched = SampleSchedule(warmup=64, total=1024, decay=decay, decay_length=256 if decay == "wsd" else 0)
    small, big = 8, 32
    assert sched.total_steps(small) == 128 and sched.total_steps(big) == 32
    lr_small = _lrs(sched, small, 128)
    lr_big = _lrs(sched, big, 32)
    # Step j at batch 32 starts at the same sample as step 4j at batch 8.
    assert lr_big == pytest.approx(lr_small[::4])


def test_resume_with_new_batch():
    sched = SampleSchedule(warmup=0, total=1000, decay="linear")
    fn_before = sched.lr_lambda(10)
    assert fn_before(30) == pytest.approx(0.7)  # 300 samples done
    fn_after = sched.lr_lambda(40, resume_step=30, resume_done=300)
    assert fn_after(30) == pytest.approx(0.7) and fn_after(31) == pytest.approx(0.66)
    assert sched.total_steps(40, done=300) == math.ceil(700 / 40)


def test_from_steps_equals_steps_over_kappa():
    ref_batch, kappa = 256, 4
    sched = SampleSchedule.from_steps(2000, 100_000, ref_batch, decay="cosine")
    assert sched.warmup == 2000 * 256 and sched.total == 100_000 * 256
    new_batch = ref_batch * kappa
    assert sched.total_steps(new_batch) == scale_steps(100_000, kappa) == 25_000
    fn_ref, fn_new = sched.lr_lambda(ref_batch), sched.lr_lambda(new_batch)
    assert fn_new(scale_steps(2000, kappa)) == pytest.approx(fn_ref(2000)) == pytest.approx(1.0)
    assert fn_new(12_345) == pytest.approx(fn_ref(12_345 * kappa))


def test_validation():
    with pytest.raises(ValueError, match="decay: must be one of"):
        SampleSchedule(warmup=0, total=10, decay="step")
    with pytest.raises(ValueError, match="warmup: 20 samples exceeds total=10"):
        SampleSchedule(warmup=20, total=10)
    with pytest.raises(ValueError, match=r"decay_length: for decay='wsd' must be in \[1, total - warmup = 10\]"):
        SampleSchedule(warmup=0, total=10, decay="wsd")
    with pytest.raises(ValueError, match="decay_length: only used by decay='wsd'"):
        SampleSchedule(warmup=0, total=10, decay="cosine", decay_length=3)
    with pytest.raises(ValueError, match=r"min_ratio: must be in \[0, 1\], got 2"):
        SampleSchedule(warmup=0, total=10, min_ratio=2)
    with pytest.raises(ValueError, match="total: expected an int >= 1, got 0"):
        SampleSchedule(warmup=0, total=0)
    with pytest.raises(ValueError, match="global_batch: expected an int >= 1, got 0"):
        SampleSchedule(warmup=0, total=10).lr_lambda(0)
    with pytest.raises(ValueError, match="unit: must be 'samples' or 'tokens'"):
        SampleSchedule(warmup=0, total=10, unit="steps")

"""Batch-size schedules: the schedule objects, their config, and train.py changing the global batch
inside a running job (real DeepSpeed engines, real gloo groups).

The processes launched: (A) one process with the schedule 8 -> 16 -> 32 uninterrupted; (B) one
process at batch 8 stopped at the first change, then resumed with the schedule; (C) two processes
with the schedule stopped between the changes, resumed on one process; (D) one process with the
automatic schedule. B's resume must compute exactly what A computed after the change (the two
paths share the rescaling); C's resume equals A up to fp32 reduction order.
"""

from __future__ import annotations

import json
import shutil

import pytest

from bigbatch.scaling import plan_batch, scale_hparams
from bigbatch.scaling.batch_schedule import AutoBatchSchedule, BatchScheduleError, FixedBatchSchedule
from bigbatch.scaling.rules import noise_lr_factor
from bigbatch.sharding.full_state import read_full_state
from bigbatch.training.config import ConfigError, load_config

from train_common import PLOT, PY, REPO, TORCHRUN, check_ok, main, records, run, small_args

SEQ = 64
T1, T2 = 10 * 8 * SEQ, 10 * 8 * SEQ + 6 * 16 * SEQ  # the changes: after 10 steps at 8, then 6 steps at 16
SCHEDULE = json.dumps([[0, 8], [T1, 16], [T2, 32]])
STEPS = 22  # 10 at batch 8, 6 at 16, 6 at 32
REF = {"lr": 1e-2, "betas": (0.9, 0.99), "final_lr": 0.1, "gamma": 1e-3, "eps": 1e-8, "weight_decay": 0.0}


# ------------------------------------------------------------------ the schedule objects


def test_fixed_schedule_is_piecewise_constant():
    s = FixedBatchSchedule([[0, 16], [200, 32], [400, 64]], unit="tokens")
    assert [s.batch_at(t) for t in (0, 199, 200, 399, 400, 10**9)] == [16, 16, 32, 32, 64, 64]
    assert s.batches() == [16, 32, 64] and s.start == 16
    assert s.next_batch(250, current=16, noise_scale=1.0) == 32  # the noise scale does not matter


@pytest.mark.parametrize("entries, match", [
    ([[0, 16], [200, 32], [200, 64]], r"schedule\[2\]: \[200, 64\]: tokens must increase"),
    ([[0, 16], [100, 0]], r"schedule\[1\]: \[100, 0\]: the global batch 0 must be an integer >= 1"),
    ([[50, 16]], r"schedule\[0\]: \[50, 16\] must start at tokens 0"),
    ([[0, 16], [100]], r"schedule\[1\]: \[100\] must be a pair \[tokens, global_batch\]"),
    ([], r"must be a non-empty list"),
    ([[0, 16], [-5, 32]], r"schedule\[1\]: \[-5, 32\]: the tokens -5 must be an integer >= 0"),
])
def test_bad_fixed_schedules_name_the_entry(entries, match):
    with pytest.raises(BatchScheduleError, match=match):
        FixedBatchSchedule(entries, unit="tokens")


def test_auto_schedule_grows_on_patient_evidence_within_bounds():
    s = AutoBatchSchedule(start=16, maximum=64, factor=2, margin=1.0, patience=3, min_gap=100)
    assert s.batches() == [16, 32, 64]
    b, pos = 16, 0
    # noise scale below the next batch: never grows
    for _ in range(10):
        pos += 10
        b = s.next_batch(pos, b, 31.0)
    assert b == 16
    # above it, but the streak is broken once: needs patience consecutive measurements
    for ns in (40.0, 40.0, 10.0, 40.0, 40.0):
        pos += 10
        b = s.next_batch(pos, b, ns)
    assert b == 16
    pos += 10
    assert s.next_batch(pos, b, 40.0) == 32  # third in a row
    b = 32
    assert s.last_change == 160
    while pos < 250:  # evidence for 64 at once, but less than min_gap (100) since the change
        pos += 10
        b = s.next_batch(pos, b, 70.0)
    assert b == 32 and s.streak >= 3
    state = s.state_dict()
    pos += 10
    assert s.next_batch(pos, b, 70.0) == 64  # 100 tokens after the change
    assert s.next_batch(pos + 1000, 64, 1e9) == 64 and s.next_batch(pos + 2000, 64, 0.0) == 64  # max; no shrink
    restored = AutoBatchSchedule(16, 64, patience=3, min_gap=100)
    restored.load_state_dict(state)
    assert restored.state_dict() == state and restored.next_batch(pos, 32, 70.0) == 64
    assert s.next_batch(pos, 16, None) == 16  # nothing measured: no growth


@pytest.mark.parametrize("kwargs, match", [
    (dict(start=64, maximum=32), r"max_global_batch: 32 is below min_global_batch=64"),
    (dict(start=16, maximum=64, factor=1), r"growth_factor 1 must be an integer >= 2"),
    (dict(start=16, maximum=64, margin=0.0), r"growth_margin: 0.0 must be a number > 0"),
])
def test_bad_auto_schedules(kwargs, match):
    with pytest.raises(BatchScheduleError, match=match):
        AutoBatchSchedule(**kwargs)


def test_config_parses_and_refuses_schedules():
    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "[[0,16],[200000,32]]"])
    assert cfg.batch.schedule == [[0, 16], [200000, 32]] and cfg.batch.batch_schedule().batches() == [16, 32]
    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "auto", "--batch.max_global_batch", "64"])
    assert cfg.batch.batch_schedule().batches() == [16, 32, 64]
    # no growth inside the lr warmup by default; an explicit value (0 included) is kept
    assert cfg.batch.growth_min_tokens == cfg.schedule.warmup_tokens == cfg.batch.batch_schedule().min_gap > 0
    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "auto", "--batch.max_global_batch", "64",
                                            "--batch.growth_min_tokens", "0"])
    assert cfg.batch.batch_schedule().min_gap == 0
    for overrides, match in [
        (["--batch.schedule", "auto"], r"batch.max_global_batch: required when batch.schedule is 'auto'"),
        (["--batch.schedule", "[[0,16],[300,32],[200,64]]"], r"batch.schedule\[2\]: \[200, 64\]: tokens must increase"),
        (["--batch.schedule", "[[0,16],[300,0]]"], r"batch.schedule\[1\]: \[300, 0\]: the global batch 0"),
        (["--batch.schedule", "fast"], r"batch.schedule: 'fast' is not allowed; give 'auto' or a list"),
        (["--batch.schedule", "[[0,16]]", "--batch.policy", "scale", "--batch.per_device_batch", "8"],
         r"batch.schedule: sets the global batch itself; batch.policy must be 'fixed'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config("configs/tiny.yaml", overrides)


def test_noise_lr_by_default_with_auto_except_for_sgd():
    auto = ["--batch.schedule", "auto", "--batch.max_global_batch", "64"]
    for optimizer, on in [("adamw", True), ("radam", True), ("adam", True), ("adabound", True), ("amsbound", True),
                          ("sgd", False)]:
        assert load_config("configs/tiny.yaml", auto).batch.noise_lr_on(optimizer) is on
        assert load_config("configs/tiny.yaml").batch.noise_lr_on(optimizer) is False  # no schedule
    assert load_config("configs/tiny.yaml", ["--batch.noise_lr", "true"]).batch.noise_lr_on("adabound") is True
    assert load_config("configs/tiny.yaml", [*auto, "--batch.noise_lr", "false"]).batch.noise_lr_on("adabound") is False
    assert load_config("configs/tiny.yaml", [*auto, "--batch.noise_lr", "false"]).batch.noise_lr_on("adamw") is False


def test_unreachable_batches_are_refused_naming_the_entry():
    from bigbatch.training.builders import check_batch

    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "[[0,12],[1000,40]]", "--batch.micro_batch_sizes",
                                            "[8, 4]"])
    with pytest.raises(ConfigError, match=r"batch.schedule\[1\]: \[1000, 40\]: global_batch: 40 cannot be reached "
                                          r"with world_size=3.*nearest feasible global batches: .*36 .*48"):
        check_batch(cfg, 3)
    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "auto", "--batch.max_global_batch", "128",
                                            "--batch.micro_batch_sizes", "[8]"])
    check_batch(cfg, 2)
    with pytest.raises(ConfigError, match=r"batch.schedule: auto grows to 16 .*global_batch: 16 cannot be reached"):
        check_batch(cfg, 3)
    # betas that the paper form cannot scale: named with the batch that needs them
    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "[[0,16],[1000,256]]"])
    with pytest.raises(ConfigError, match=r"batch.schedule\[1\]: \[1000, 256\]: beta1=0.9 at kappa=16"):
        check_batch(cfg, 2)


def test_auto_splits_a_step_for_the_noise_scale_or_says_how():
    from bigbatch.training.builders import make_plan

    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "auto", "--batch.max_global_batch", "64"])
    plan = make_plan(cfg, 1)  # micro sizes [16, 8, 4]: 16 on one process would be one micro batch
    assert (plan.global_batch, plan.micro_batch, plan.grad_accum) == (16, 8, 2)
    assert make_plan(load_config("configs/tiny.yaml"), 1).grad_accum == 1  # unchanged without the need
    cfg = load_config("configs/tiny.yaml", ["--batch.schedule", "auto", "--batch.max_global_batch", "64",
                                            "--batch.micro_batch_sizes", "[16]"])
    with pytest.raises(ConfigError, match=r"fewer than 2 micro batches per step; add a micro batch size that divides "
                                          r"16 at least 2 times.*noise scale"):
        make_plan(cfg, 1)


def test_planner_min_micro_batches():
    p = plan_batch(1, [16, 8, 4], reference_global_batch=16, optimizer="adam", hparams={}, min_micro_batches=2)
    assert (p.micro_batch, p.grad_accum) == (8, 2)
    p = plan_batch(2, [16, 8, 4], reference_global_batch=16, optimizer="adam", hparams={}, min_micro_batches=2)
    assert (p.micro_batch, p.grad_accum) == (8, 1)  # two ranks already give two micro batches


# ------------------------------------------------------------------ train.py, real engines


def sched_args(cache: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", *small_args(cache), "--train.eval_every", "0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """(A): one process, 8 -> 16 -> 32 inside the run, with a tiny warn factor (one warning)."""
    out = tmp_path_factory.mktemp("a") / "run"
    proc = run([PY, "train.py", *sched_args(cache), "--out", str(out), "--batch.schedule", SCHEDULE,
                "--train.max_steps", str(STEPS), "--train.noise_scale_warn_factor", "0.01", *PLOT])
    check_ok(proc)
    return out, proc


@pytest.mark.slow
def test_batch_changes_inside_the_run_apply_the_rules(uninterrupted):
    out, proc = uninterrupted
    train = records(out)
    changes = records(out, "batch_change")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [(c["step"], c["tokens"], c["old_global_batch"], c["global_batch"]) for c in changes] == \
        [(10, T1, 8, 16), (16, T2, 16, 32)]
    # data continues: every step takes the next global-batch samples, no sample twice, none skipped
    samples = [0] + [r["samples"] for r in train]
    assert [b - a for a, b in zip(samples, samples[1:])] == [8] * 10 + [16] * 6 + [32] * 6
    assert [r["global_batch"] for r in train] == [8] * 10 + [16] * 6 + [32] * 6
    assert [r["kappa"] for r in train] == [1.0] * 10 + [2.0] * 6 + [4.0] * 6
    # every hyperparameter follows the rule for the reference batch 8 (kappa 2, then 4)
    for change, kappa in zip(changes, (2.0, 4.0)):
        want = scale_hparams("adabound", REF, kappa)
        assert change["kappa"] == kappa and change["micro_batch"] * change["grad_accum"] == change["global_batch"]
        assert change["lr_peak"] == pytest.approx(want["lr"], rel=1e-12)
        for key in ("final_lr", "gamma", "eps", "weight_decay"):
            assert change[key] == pytest.approx(want[key], rel=1e-12), key
        assert (change["beta1"], change["beta2"]) == pytest.approx(want["betas"], rel=1e-12)
        assert change["noise_scale"] > 0  # measured before the change (4 x 2 micro batches on one process)
    last = train[-1]
    assert last["beta1"] == pytest.approx(0.6) and last["final_lr"] == pytest.approx(0.2)  # bound_form sqrt
    assert "batch change at step 10" in proc.stdout and "global batch 8 -> 16 = 4 x 4 accum x 1" in proc.stdout
    # the noise scale is measured by default (every step has >= 2 micro batches) and warns once
    assert all(r.get("noise_scale", 0) > 0 for r in train[1:])
    warnings = records(out, "warning")
    assert len(warnings) == 1 and "past the critical batch" in warnings[0]["message"]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_resume_at_the_new_batch_equals_the_change_inside_the_run(uninterrupted, tmp_path, cache):
    """(B): batch 8 until T1, checkpoint, then --resume with the schedule: the resumed run moves to 16
    through the same path as (A) did inside its run, so the numbers are the same."""
    a = {r["step"]: r for r in records(uninterrupted[0])}
    out = tmp_path / "b"
    check_ok(run([PY, "train.py", *sched_args(cache), "--out", str(out), "--batch.schedule", "[[0, 8]]",
                  "--train.max_steps", "10"]))
    proc = run([PY, "train.py", "--resume", str(out), "--batch.schedule", SCHEDULE, "--train.max_steps", str(STEPS)])
    check_ok(proc)
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for r in got:
        ref = a[r["step"]]
        assert (r["samples"], r["global_batch"]) == (ref["samples"], ref["global_batch"])
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-9, abs=1e-12), r["step"]
        assert r["lr"] == pytest.approx(ref["lr"], rel=1e-12) and r["beta1"] == ref["beta1"]
        assert r["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-7), r["step"]


@pytest.mark.slow
def test_resume_mid_schedule_on_fewer_processes(uninterrupted, tmp_path, cache):
    """(C): two processes stop between the changes (batch 16 in force); one process resumes, keeps 16,
    then moves to 32 at T2, and follows the single-process run."""
    a = {r["step"]: r for r in records(uninterrupted[0])}
    out = tmp_path / "c"
    check_ok(run(TORCHRUN + ["train.py", *sched_args(cache), "--out", str(out), "--batch.schedule", SCHEDULE,
                             "--train.max_steps", "13"]))
    assert records(out)[-1]["global_batch"] == 16
    check_ok(run([PY, "train.py", "--resume", str(out), "--train.max_steps", str(STEPS)]))
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    assert [r["global_batch"] for r in got] == [a[s]["global_batch"] for s in range(1, STEPS + 1)]
    for r in got:  # 2 ranks vs 1 rank: the same sums in another order
        assert r["loss"] == pytest.approx(a[r["step"]]["loss"], rel=1e-5, abs=1e-6), r["step"]
        assert r["samples"] == a[r["step"]]["samples"]
    changes = records(out, "batch_change")
    assert [(c["step"], c["global_batch"]) for c in changes] == [(10, 16), (16, 32)]


@pytest.mark.slow
def test_auto_schedule_grows_within_its_bounds_and_resumes(tmp_path, cache):
    """(D): grows 8 -> 16 -> 32 (factor 2, max 32) as soon as the evidence allows, never further; the lr
    follows the noise scale, AdaBound's bounds and decoupled decay do not; a resume from step 10 repeats 11-20."""
    out = tmp_path / "d"
    proc = run([PY, "train.py", *sched_args(cache), "--out", str(out), "--batch.schedule", "auto",
                "--batch.max_global_batch", "32", "--batch.growth_margin", "0.001", "--batch.growth_patience", "3",
                "--batch.growth_min_tokens", str(5 * 8 * SEQ), "--train.max_steps", "20", "--batch.noise_lr", "true",
                "--checkpoint.every_steps", "10", "--optim.hparams.weight_decay", "0.01",
                "--optim.hparams.decoupled_weight_decay", "true"])
    check_ok(proc)
    train = records(out)
    batches = [r["global_batch"] for r in train]
    assert batches == sorted(batches) and set(batches) == {8, 16, 32} and max(batches) == 32
    changes = records(out, "batch_change")
    assert [c["global_batch"] for c in changes] == [16, 32]
    assert changes[0]["step"] >= 5 and changes[1]["tokens"] - changes[0]["tokens"] >= 5 * 8 * SEQ
    assert all(c["noise_scale"] > 0 for c in changes) and train[-1]["kappa"] == 4.0
    # the lr follows the measured noise scale (batch.noise_lr, here for AdaBound): 1 at the reference batch 8,
    # above it the factor of the B_noise that the previous step left
    assert all(r["lr_noise_factor"] == 1.0 for r in train if r["kappa"] == 1)
    grown = [(prev, r) for prev, r in zip(train, train[1:]) if r["kappa"] > 1]
    assert grown and all(r["lr_noise_factor"] == pytest.approx(
        noise_lr_factor("adabound", r["global_batch"], 8, prev["noise_scale"]), rel=1e-9) for prev, r in grown)
    assert all(r["lr_noise_factor"] > 1 for _, r in grown)
    # the bounds final_lr x lr / base_lr stay where the rule and the schedule put them: base_lr carries the factor
    check_bounds_and_decay_without_the_factor(out, train[-1])
    # a resume from step 10 (the schedule's and the noise meter's state, the values without the factor) repeats 11-20
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step00000020")
    check_ok(run([PY, "train.py", "--resume", str(again), "--train.max_steps", "20"]))
    resumed = records(again)
    assert [r["step"] for r in resumed] == list(range(1, 21))
    for a, b in zip(train, resumed):
        assert (a["global_batch"], a["loss"], a["lr"], a["lr_noise_factor"]) == \
            (b["global_batch"], b["loss"], b["lr"], b["lr_noise_factor"]), a["step"]
    check_bounds_and_decay_without_the_factor(again, resumed[-1])


def check_bounds_and_decay_without_the_factor(out, last_record: dict) -> None:
    """At the end of an AdaBound run with the noise lr and decoupled weight decay: the bounds, final_lr x lr /
    base_lr, follow the lr schedule's factor alone (lr / peak), and the decay per step, lr x wd, is the rule's
    peak lr x wd x that factor; ``base_lr`` and ``weight_decay`` carry the noise factor that cancels."""
    state = read_full_state(str(out / "checkpoints"), "step00000020")
    group, client, factor = state.groups[0]["hparams"], state.meta["client_state"], last_record["lr_noise_factor"]
    free, peak = client["factor_free"][0], client["peak_lrs"][0]
    schedule = last_record["lr"] / (factor * peak)
    assert factor > 1 and free["base_lr"] == peak and free["weight_decay"] == pytest.approx(0.01 * 4 / 2)  # kappa 4
    assert group["base_lr"] == pytest.approx(free["base_lr"] * factor, rel=1e-12)
    assert group["lr"] / group["base_lr"] == pytest.approx(schedule, rel=1e-12)
    assert group["lr"] * group["weight_decay"] == pytest.approx(peak * schedule * free["weight_decay"], rel=1e-12)


def test_bad_schedules_exit_2(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = [*sched_args(cache), "--out", str(tmp_path / "x")]
    cases = [
        (["--batch.schedule", "[[0,8],[100,10]]"], "batch.schedule[1]: [100, 10]: global_batch: 10 cannot be reached"),
        (["--batch.schedule", "[[0,8],[100,16],[50,32]]"], "batch.schedule[2]: [50, 32]: tokens must increase"),
        (["--batch.schedule", "[[0,8],[100,0]]"], "batch.schedule[1]: [100, 0]: the global batch 0"),
        (["--batch.schedule", "auto"], "batch.max_global_batch: required"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_auto_schedule_says_why_it_keeps_and_grows(tmp_path, cache):
    """Every growth and every change of reason on a logging step is a batch_decision record with
    B_noise, consistent with the schedule's rule, and a line on the console."""
    out = tmp_path / "e"
    margin = 0.5
    proc = run([PY, "train.py", *sched_args(cache), "--out", str(out), "--batch.schedule", "auto",
                "--batch.max_global_batch", "16", "--batch.growth_margin", str(margin), "--batch.growth_patience", "3",
                "--train.max_steps", "16"])
    check_ok(proc)
    decisions = records(out, "batch_decision")
    assert decisions and all(d["noise_scale"] > 0 for d in decisions)
    for d in decisions:
        grown = d["global_batch"] * 2
        if d["next_global_batch"] != d["global_batch"]:
            assert d["noise_scale"] >= margin * grown and "on 3 measurements" in d["reason"]
        elif d["reason"].startswith("B_noise below"):
            assert d["noise_scale"] < margin * grown
        elif d["reason"].startswith("at max_global_batch"):
            assert d["global_batch"] == 16
    growth = [d for d in decisions if d["next_global_batch"] != d["global_batch"]]
    changes = records(out, "batch_change")
    assert [(d["step"], d["next_global_batch"]) for d in growth] == [(c["step"], c["global_batch"]) for c in changes]
    assert proc.stdout.count("batch schedule auto ") == len(decisions)

"""SVAG (the gradient transform and its hyperparameters) and ``bigbatch check-rules``: one 2-process
check from a real checkpoint (branches at kappa 1, 2 and SVAG l = 2, real DeepSpeed engines), bad
inputs in-process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from train_common import PY, REPO, TORCHRUN, check_ok, run, small_args

from bigbatch.scaling.svag import micro_weights, paper_weights, svag_hparams, svag_weights


# ------------------------------------------------------------------ the transform


@pytest.mark.parametrize("l", [1.0, 2.0, 4.0, 9.0])
def test_svag_gradient_has_the_mean_and_l_times_the_noise(l):
    """Per-sample gradients mu + z with a known full covariance S; a step of B = 8 samples on 2
    ranks x 2 micro batches of 2, combined by the micro-batch loss weights and the engine's mean over
    all micro batches: mean mu and covariance l S / B (l = 1: the plain batch mean, exactly)."""
    rng = np.random.default_rng(0)
    world, accum, micro, draws = 2, 2, 2, 200_000
    batch = world * accum * micro
    mu = np.array([1.0, -2.0, 0.5])
    chol = np.array([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [-0.3, 0.2, 0.5]])
    cov = chol @ chol.T
    # samples of micro step m on rank r: global micro index m * world + r (the loader's order)
    g = mu + rng.standard_normal((draws, world * accum, micro, 3)) @ chol.T
    micro_means = g.mean(axis=2)  # (draws, n, 3)
    weights = np.zeros(world * accum)
    for r in range(world):
        for m, w in enumerate(micro_weights(l, rank=r, world_size=world, grad_accum=accum)):
            weights[m * world + r] = w
    step = (weights[None, :, None] * micro_means).mean(axis=1)  # DeepSpeed / DDP / FSDP: mean over micro batches
    if l == 1:
        np.testing.assert_allclose(step, micro_means.mean(axis=1), rtol=0, atol=1e-12)
    se = np.sqrt(np.diag(l * cov / batch) / draws)
    assert np.all(np.abs(step.mean(axis=0) - mu) < 5 * se)
    emp = np.cov(step, rowvar=False)
    np.testing.assert_allclose(emp, l * cov / batch, rtol=0.03, atol=0.03 * l * np.abs(cov).max() / batch)


@pytest.mark.parametrize("l", [1.0, 1.5, 3.0, 16.0])
def test_weights_sum_to_one_with_l_times_the_variance(l):
    a, b = svag_weights(l)  # halves of one batch: each half has twice the noise of the batch
    assert a + b == pytest.approx(1.0) and 2 * (a * a + b * b) == pytest.approx(l)
    a, b = paper_weights(l)  # the papers' two full batches
    assert a + b == pytest.approx(1.0) and a * a + b * b == pytest.approx(l)


def test_micro_weights_refuse_an_odd_step_and_bad_l():
    assert micro_weights(1.0, rank=0, world_size=1, grad_accum=3) == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="3 micro batches .* even number"):
        micro_weights(2.0, rank=0, world_size=1, grad_accum=3)
    for bad in (0.5, 0, float("nan"), "x", True):
        with pytest.raises(ValueError, match="svag l"):
            svag_weights(bad)


def test_svag_hyperparameters_are_the_rule_at_one_over_l():
    l = 4.0
    adam = svag_hparams("adam", {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, l)
    assert adam["lr"] == pytest.approx(1e-3 / 2) and adam["eps"] == pytest.approx(2e-8)
    assert adam["betas"] == pytest.approx((1 - 0.1 / l, 1 - 0.001 / l))
    assert svag_hparams("sgd", {"lr": 0.1, "momentum": 0.9}, l) == pytest.approx({"lr": 0.025, "momentum": 0.9})
    ab = svag_hparams("adabound", {"lr": 1e-3, "final_lr": 0.1, "gamma": 1e-3}, l)
    assert ab["final_lr"] == pytest.approx(0.1 / l) and ab["gamma"] == pytest.approx(1e-3 / l)
    radam = svag_hparams("radam", {"lr": 1e-3}, 1.0)
    assert radam["lr"] == 1e-3 and radam["betas"] == (0.9, 0.999)  # l = 1: the plain optimizer


def test_svag_chooses_micro_batches_that_split_a_step_into_halves():
    """The shipped config on one process: a step of one micro batch of 16 cannot split, two of 8 can."""
    from bigbatch.check_rules import svag_micro_sizes
    from bigbatch.training.config import load_config

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"))
    assert list(cfg.batch.micro_batch_sizes) == [16, 8, 4]
    assert svag_micro_sizes(cfg, 1, 16) == [8]
    assert svag_micro_sizes(cfg, 2, 16) == [16, 8, 4]  # 2 processes: already two halves
    assert svag_micro_sizes(load_config(str(REPO / "configs" / "tiny.yaml"), ["--batch.micro_batch_sizes", "[7]",
                                                                           "--batch.reference_global_batch", "7"]),
                            1, 7) is None


def _result(name: str, kappa: float, loss: float, l: float = 1.0, batch: int = 8):
    from bigbatch.check_rules import BranchResult

    return BranchResult(name, kappa, l, True, int(batch * kappa), 0, evals=[[0, 5.0], [100, loss]], final_loss=loss)


def test_critical_batch_is_a_lower_bound_when_every_kappa_held():
    from bigbatch.check_rules import judge, markdown

    def report(results):
        summary = judge(results, 0.01)
        branches = [{**r.__dict__, "noise_scale": None} for r in results]
        start = {"tag": None, "tokens": 0, "global_batch": 8, "noise_scale": None}
        return summary, markdown({"summary": summary, "start": start, "branches": branches, "optimizer": "adamw",
                                  "tokens": 100, "eval_every": 50, "eval_blocks": 4})

    held = [_result("k1", 1, 4.0), _result("k1_seed2", 1, 4.0), _result("k2", 2, 4.01), _result("k4", 4, 4.02)]
    summary, md = report(held)
    assert summary["critical_batch"] == 32 and summary["critical_batch_is_lower_bound"]
    assert "**Measured critical batch: at least 32**" in md and "B_noise at the start: not measured;" in md
    broke = [_result("k1", 1, 4.0), _result("k1_seed2", 1, 4.0), _result("k2", 2, 4.01), _result("k4", 4, 4.5)]
    summary, md = report(broke)
    assert summary["critical_batch"] == 16 and not summary["critical_batch_is_lower_bound"]
    assert "**Measured critical batch: 16**" in md


# ------------------------------------------------------------------ check-rules, end to end


@pytest.mark.slow
def test_check_rules_from_a_checkpoint_on_two_processes(tmp_path, cache):
    """A 2-process run saves a checkpoint; check-rules branches from it (k1, k1_seed2, k2, k2 without
    the rule, SVAG l=2) and writes a report whose steps follow tokens / batch and whose branches are
    evaluated at the same token counts, starting from the checkpoint's loss."""
    src = tmp_path / "src"
    check_ok(run([*TORCHRUN, "train.py", "--config", "configs/tiny.yaml", "--out", str(src), *small_args(cache),
                  "--train.max_steps", "6", "--logging.progress", "none"]))
    out = tmp_path / "check"
    tokens = 2048
    proc = run([*TORCHRUN, "-m", "bigbatch.cli", "check-rules", "--from", str(src), "--kappas", "1,2",
                "--tokens", str(tokens), "--evals", "2", "--svag", "2", "--without-rules", "--out", str(out),
                "--logging.progress", "none"])
    check_ok(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["start"]["tag"] == "step00000006" and report["start"]["global_batch"] == 8
    assert report["start"]["tokens"] == 6 * 8 * 64 and report["start"]["noise_scale"] is not None
    seq = report["seq_len"]
    by = {b["name"]: b for b in report["branches"]}
    assert set(by) == {"k1", "k1_seed2", "k2", "k2_norule", "svag2"}
    assert report["tokens"] == tokens and report["eval_every"] == tokens // 2
    for b in by.values():
        assert b["steps"] * b["global_batch"] * seq == b["l"] * tokens == b["tokens"]
        assert [e[0] for e in b["evals"]] == [0, tokens // 2, tokens]  # SDE tokens: the same points
        assert b["evals"][0][1] == pytest.approx(by["k1"]["evals"][0][1], rel=1e-6)  # the same start
        assert b["final_loss"] == b["evals"][-1][1]
    assert by["k2"]["global_batch"] == 16 and by["svag2"]["global_batch"] == 8
    assert by["k1_seed2"]["final_loss"] != by["k1"]["final_loss"]  # another data order
    assert by["k2"]["final_loss"] != by["k2_norule"]["final_loss"]  # the rule changed something
    s = report["summary"]
    assert s["tolerance"] == pytest.approx(max(0.01, 2 * s["seed_gap"]))
    for name in ("k2", "k2_norule", "svag2"):
        gap = by[name]["gap"]
        assert by[name]["verdict"] == ("holds" if (abs(gap) if name == "svag2" else gap) <= s["tolerance"] else "breaks")
    assert s["critical_batch"] == (16 if by["k2"]["verdict"] == "holds" else 8)
    assert s["sde_holds"] == (by["svag2"]["verdict"] == "holds")
    md = (out / "report.md").read_text()
    assert "Measured critical batch" in md and "| k2 | 16 |" in md
    assert (out / "eval_loss.png").stat().st_size > 1000
    # the SVAG branch ran at the rule for kappa 1/2 (first train record of its metrics)
    first = json.loads((out / "branches" / "svag2" / "metrics.jsonl").read_text().splitlines()[1])
    assert first["beta2"] == pytest.approx(1 - (1 - 0.99) / 2)
    banners = [ln for ln in proc.stdout.splitlines() if ln.startswith("bigbatch: ") and "params |" in ln]
    assert len(banners) == 5 and sum("betas (0.95, 0.995)" in ln for ln in banners) == 1, banners  # svag2's
    # AdaBound's clipped shares are logged, summed over the ZeRO partitions of both ranks
    assert 0 <= first["clipped_lower"] <= 1 and 0 <= first["clipped_upper"] <= 1
    assert first["clipped_lower"] + first["clipped_upper"] > 0


@pytest.mark.slow
def test_check_rules_from_initialisation_under_fsdp2(tmp_path, cache):
    """The same branches on the FSDP2 engine from initialisation: every branch starts from the same
    weights (the same first eval), k2 runs at the rule's hyperparameters, SVAG's weighted micro-batch
    losses change the trajectory."""
    out = tmp_path / "check"
    check_ok(run([*TORCHRUN, "-m", "bigbatch.check_rules", "--config", "configs/tiny.yaml",
                  *small_args(cache), "--train.engine", "fsdp2", "--kappas", "1,2", "--svag", "2", "--tokens", "2048",
                  "--evals", "2", "--out", str(out), "--logging.progress", "none"]))
    report = json.loads((out / "report.json").read_text())
    assert report["start"]["tag"] is None and report["start"]["global_batch"] == 8
    by = {b["name"]: b for b in report["branches"]}
    assert {b["steps"] for b in by.values()} == {4, 2, 8} and by["k2"]["steps"] == 2 and by["svag2"]["steps"] == 8
    start = by["k1"]["evals"][0][1]
    assert all(b["evals"][0][1] == pytest.approx(start, rel=1e-6) for b in by.values())
    assert by["k1"]["final_loss"] < start  # it trained
    assert by["svag2"]["final_loss"] != pytest.approx(by["k1"]["final_loss"], rel=1e-6)
    k2 = json.loads((out / "branches" / "k2" / "metrics.jsonl").read_text().splitlines()[1])
    assert (k2["beta1"], k2["global_batch"]) == (pytest.approx(0.8), 16)


def test_check_rules_bad_inputs(tmp_path, cache, capsys, monkeypatch):
    from bigbatch.check_rules import main

    monkeypatch.chdir(REPO)
    saved = dict(os.environ)
    base = ["--config", "configs/tiny.yaml", *small_args(cache), "--logging.progress", "none"]
    try:
        empty = tmp_path / "empty"
        (empty / "checkpoints").mkdir(parents=True)
        (empty / "config.resolved.yaml").write_text("model: {hidden_size: 32}\n")
        assert main([*base, "--from", str(empty), "--tokens", "4096", "--out", str(tmp_path / "a")]) == 2
        assert "--from:" in (err := capsys.readouterr().err) and "has no complete checkpoint" in err

        assert main([*base, "--kappas", "1,1.5", "--batch.micro_batch_sizes", "8", "--tokens", "40960",
                     "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err
        assert "--kappas: kappa 1.5 (global batch 12 on 1 process(es)) cannot be run" in err

        assert main([*base, "--kappas", "1,0.1", "--tokens", "40960", "--out", str(tmp_path / "c")]) == 2
        assert "--kappas: 0.1 x the starting batch 8" in capsys.readouterr().err

        assert main([*base, "--kappas", "1,4", "--tokens", "1000", "--out", str(tmp_path / "d")]) == 2
        assert "--tokens: 1000 is shorter than one step at the largest batch (32 sequences x 64 tokens" in \
            capsys.readouterr().err

        assert main([*base, "--svag", "2", "--tokens", "40960", "--batch.micro_batch_sizes", "7",
                     "--batch.reference_global_batch", "7", "--out", str(tmp_path / "e")]) == 2  # 7 is odd: no halves
        assert "--svag: l=2 at global batch 7 on 1 process(es): no micro batch" in capsys.readouterr().err

        assert main([*base, "--svag", "0.5", "--tokens", "40960", "--out", str(tmp_path / "f")]) == 2
        assert "--svag: svag l" in capsys.readouterr().err
        assert not any((tmp_path / x / "report.json").exists() for x in "abcdef")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_check_rules_is_a_bigbatch_subcommand():
    proc = run([PY, "-m", "bigbatch.cli", "check-rules", "--help"], timeout=120)
    check_ok(proc)
    assert "--kappas" in proc.stdout and "--svag" in proc.stdout and "critical batch" in proc.stdout


@pytest.mark.slow
def test_check_rules_reports_the_checkpoint_its_branches_started_from(tmp_path, cache):
    """The newest tag fails its hash check: the branches start from the previous one, and the report
    says so (its tag, step and tokens), not the newest."""
    src = tmp_path / "src"
    check_ok(run([PY, "train.py", "--config", "configs/tiny.yaml", "--out", str(src), *small_args(cache),
                  "--train.max_steps", "6", "--checkpoint.every_steps", "3", "--logging.progress", "none"]))
    newest = src / "checkpoints" / "step00000006"
    victim = newest / "bigbatch_rng_rank0.pt"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    victim.write_bytes(bytes(data))
    out = tmp_path / "check"
    proc = run([PY, "-m", "bigbatch.cli", "check-rules", "--from", str(src), "--kappas", "1",
                "--tokens", "1024", "--evals", "1", "--out", str(out), "--logging.progress", "none"])
    check_ok(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["start"]["tag"] == "step00000003" and report["start"]["step"] == 3
    assert report["start"]["tokens"] == 3 * report["start"]["global_batch"] * report["seq_len"]
    assert "step00000003" in (out / "report.md").read_text() and "step00000006" not in (out / "report.md").read_text()
    assert "passed over: step00000006" in proc.stdout
    k1 = json.loads((out / "branches" / "k1" / "metrics.jsonl").read_text().splitlines()[0])
    assert k1["kind"] == "eval" and k1["step"] == 3

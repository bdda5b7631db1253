"""``bigbatch plan``: the command on the shipped 1.3B config (text and JSON), its refusals, and the memory
model's arithmetic (bigbatch.scaling.memory). The model against measured peaks: benchmarks/plan_memory.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.scaling import memory
from bigbatch.training.plan import main as plan_main

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
CLUSTER = ["--config", "configs/1.3b.yaml", "--nodes", "4", "--gpus-per-node", "8", "--gpu", "h100"]
# a Llama-2-70B-sized model (8192 x 80 layers, MLP 28672) on one GPU without sharding
HUGE = ["--config", "configs/1.3b.yaml", "--nodes", "1", "--gpus-per-node", "1", "--model.hidden_size", "8192",
        "--model.num_layers", "80", "--model.num_heads", "64", "--model.num_kv_heads", "8",
        "--model.intermediate_size", "28672", "--deepspeed.zero_stage", "0"]


def llama_params(h: int, layers: int, inter: int, vocab: int, kv_ratio: float = 1.0) -> int:
    """Parameters of a tied-embedding Llama counted from its matrices (q, o: h^2; k, v: h^2 x kv share;
    gate, up, down: h x inter; two norms per block and a final one)."""
    return vocab * h + layers * (2 * h * h + int(2 * h * h * kv_ratio) + 3 * h * inter + 2 * h) + h


@pytest.fixture(scope="module")
def cli_run():
    """One real ``bigbatch plan`` process on the 1.3B config at 4 x 8 H100 (the text table)."""
    cmd = [sys.executable, "-m", "bigbatch.cli", "plan", *CLUSTER]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_plan_1_3b_text(cli_run):
    assert cli_run.returncode == 0, cli_run.stderr
    out = cli_run.stdout
    count = int(out.split("model: llama, ", 1)[1].split(" parameters", 1)[0].replace(",", ""))
    known = llama_params(2048, 24, 5504, 50304)  # configs/1.3b.yaml, GPT-2's vocabulary padded to 64
    assert abs(count - known) / known < 0.05
    for label in ("ZeRO stage 0", "ZeRO stage 1", "ZeRO stage 2 <- config", "ZeRO stage 3", "FSDP2"):
        assert f"| {label} |" in out
    # the batch plan: the reference 512 sequences on 32 GPUs with the largest micro batch that divides it
    assert "global 512 sequences (1,048,576 tokens) = micro 8 x accumulation 2 x 32 GPUs" in out
    assert "| lr | 0.0002 | 0.0002 | x sqrt(kappa) |" in out
    assert "| fixed small | 4 |" in out


def test_plan_json_and_scaled_batch(capsys):
    rc = plan_main([*CLUSTER, "--json", "--batch.policy", "scale", "--batch.per_device_batch", "32",
                    "--optim.name", "amsbound", "--optim.hparams.final_lr", "0.6"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    b = doc["batch"]
    assert (b["global_batch"], b["micro_batch"], b["grad_accum"], b["kappa"]) == (1024, 8, 4, 2.0)
    hp = {r["key"]: r for r in doc["hparams"]}
    assert hp["lr"]["scaled"] == pytest.approx(2e-4 * 2 ** 0.5)
    assert hp["betas"]["scaled"] == pytest.approx([0.8, 0.9])
    assert hp["final_lr"]["rule"] == "x sqrt(kappa)" and hp["gamma"]["rule"] == "x kappa"
    assert doc["optimizer_states_per_parameter"] == 3  # AMSBound's max_exp_avg_sq
    z2, z3 = doc["memory"]["zero2"], doc["memory"]["zero3"]
    p = doc["model"]["parameters"]
    # ZeRO-2 in bf16 on 32 GPUs: bf16 weights whole, fp32 master and three states sharded
    assert z2["weights"] == pytest.approx(2 * p) and z2["optimizer"] == pytest.approx(16 * p / 32)
    assert z3["weights"] < z2["weights"] / 10
    assert z2["activations_checkpointed"] < z2["activations"]
    assert z2["largest_micro_batch_checkpointed"] > z2["largest_micro_batch"] >= 8
    assert set(doc["cost"]["strategies"]) == {"fixed small", "fixed large"}  # no schedule: no move to make


def test_plan_auto_schedule(capsys):
    rc = plan_main([*CLUSTER, "--json", "--batch.schedule", "auto", "--batch.max_global_batch", "2048",
                    "--scale_out.max_nodes", "16"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    traj = doc["schedule"]["trajectory"]
    assert traj[0] == {"tokens": 0.0, "global_batch": 512.0} and traj[-1]["global_batch"] > 512
    assert all(a["global_batch"] < b["global_batch"] for a, b in zip(traj, traj[1:]))
    rows = doc["cost"]["strategies"]
    assert rows["scale-out"]["nodes"] == "4->16" and rows["scale-out"]["moves"] >= 1
    assert rows["fixed small"]["node_h"] < rows["fixed large"]["node_h"]
    assert any("critical batch" in a for a in doc["assumptions"])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_plan_refuses_what_does_not_fit(capsys):
    assert plan_main(HUGE) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: ZeRO stage 0 needs ") and "H100 80GB has 77 GB usable" in line
    assert "--deepspeed.zero_stage 3 with " in line and "GPUs or more (--nodes " in line


@pytest.mark.parametrize("args, key", [
    (["--model.hiden_size", "64"], "model.hiden_size"),
    (["--gpu", "tpu"], "--gpu"),
    (["--nodes", "0"], "--nodes"),
    (["--deepspeed.zero_stage", "5"], "deepspeed.zero_stage"),
])
def test_plan_bad_input(capsys, args, key):
    assert plan_main([*CLUSTER, *args]) == 2
    assert key in one_error_line(capsys)


def test_memory_model_arithmetic():
    """The per-engine states of the module's table, on a made-up shape."""
    shape = memory.ModelShape("llama", 1000, 2, 8, 16, 2, 2, 10, 400, 200, (100,) * 10)
    for engine, expect in (("zero0", 4 * 1000 * (1 + 1 + 2)), ("zero1", 4 * 1000 + 4 * 1000 / 4 + 12 * 1000 / 4),
                           ("fsdp2", 16 * 1000 / 4)):
        est = memory.estimate(shape, memory.Strategy(engine, 4, "fp32", 2), 1, 4)
        assert est.states == pytest.approx(expect), engine
    amsbound = memory.estimate(shape, memory.Strategy("zero2", 4, "bf16", 3), 1, 4)
    assert amsbound.optimizer == pytest.approx((4 + 12) * 1000 / 4)
    # activations grow linearly with the micro batch; checkpointing keeps one block's and the inputs
    a1 = memory.activation_bytes(shape, 1, 4, 2)
    assert memory.activation_bytes(shape, 3, 4, 2) == pytest.approx(3 * a1)
    assert memory.activation_bytes(shape, 1, 4, 2, checkpointing=True) < a1
    budget = memory.estimate(shape, memory.Strategy("zero2", 4), 7, 4).peak
    assert memory.largest_micro_batch(shape, memory.Strategy("zero2", 4), 4, budget) == 7


def test_announce_and_check_peak(capsys):
    """At a run's start: the one-line summary and the peak's baseline; at its end a warning only when the
    measured peak (here resident memory, on CPU) passes 1.25 x the plan's and the plan by 0.5 GB."""
    import types

    import torch

    from bigbatch.training.config import load_config
    from bigbatch.training.plan import announce, check_peak

    cfg = load_config("configs/tiny.yaml", ["--train.engine", "fsdp2"])
    info = types.SimpleNamespace(device=torch.device("cpu"), world_size=1, local_world_size=1, is_main=True)
    planned = announce(cfg, info, tokenizer_size=2048, seq_len=cfg.data.seq_len)
    line = capsys.readouterr().out.strip()
    assert line.startswith("plan: ") and "FSDP2 fp32 on 1 process: " in line and "global batch 16 = " in line
    assert planned.predicted > 0 and planned.device == "cpu"
    assert check_peak(planned) is None  # nothing allocated since
    small = torch.ones(int(0.6 * planned.predicted) // 4)  # 1.6 x the tiny plan, but a process's overhead
    assert check_peak(planned, say=print) is None
    big = torch.ones(int(planned.predicted + 0.6 * 2**30) // 4)  # touched: resident
    said = []
    text = check_peak(planned, say=said.append)
    assert text is not None and said == [text] and "the plan (bigbatch.scaling.memory) underestimates" in text
    del big, small

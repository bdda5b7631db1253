"""``train.compile`` (each decoder block under torch.compile, Inductor's C++ on this CPU) against the eager
model, on both engines, and ``train.profile_steps`` (a Chrome trace per rank).

Three single-process runs of 8 steps: eager DeepSpeed (profiling steps 2..3), compiled DeepSpeed, compiled
FSDP2. Inductor fuses and reorders float32 arithmetic, so the compiled losses differ from the eager ones
by rounding (a few 1e-7 relative were seen); 1e-3 relative bounds that, and an error in the compiled graph
(a dropped norm, a wrong mask) moves the loss by far more. The compiled runs share one Inductor cache
directory of their own: it starts empty, so the first compiles from scratch and the cache filling up
shows that Inductor compiled the model; the second finds the same block graphs there.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bigbatch.training.config import ModelConfig
from bigbatch.training.model import build_model, compile_model
from train_common import PY, REPO, check_ok, env, records, small_args

STEPS = 8


def _train(out: Path, cache: str, inductor: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [PY, "train.py", "--config", "configs/tiny.yaml", "--out", str(out), *small_args(cache),
           "--train.max_steps", str(STEPS), "--train.eval_every", "0", "--logging.plot", "false",
           "--logging.tensorboard", "false", "--checkpoint.at_end", "false", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env={**env(), "TORCHINDUCTOR_CACHE_DIR": str(inductor)},
                          capture_output=True, text=True, timeout=1200)  # a hang guard only
    check_ok(proc)
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("compile")
    inductor = root / "inductor"
    out = {name: root / name for name in ("eager", "compiled")}
    _train(out["eager"], cache, inductor, "--train.profile_steps", "[2, 3]")
    assert not inductor.exists() or not any(inductor.rglob("*.py")), "the eager run compiled something"
    _train(out["compiled"], cache, inductor, "--train.compile", "true")
    assert any(inductor.rglob("*.py")), "no Inductor code was generated: the model was not compiled"
    return {**out, "inductor": inductor}


def _same_losses(a: Path, b: Path) -> list[dict]:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, STEPS + 1))
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3), x["step"]
    (ea,), (eb,) = records(a, "eval"), records(b, "eval")  # the final evaluation: the no-grad graph
    assert eb["eval_loss"] == pytest.approx(ea["eval_loss"], rel=1e-3)
    assert ra[-1]["loss"] < ra[0]["loss"] - 0.1  # it trains: the comparison is not of two constants
    return list(zip(ra, rb))


@pytest.mark.slow
def test_compiled_deepspeed_matches_eager_and_the_noise_scale_hooks_still_fire(runs):
    pairs = _same_losses(runs["eager"], runs["compiled"])
    # micro 4 x 2 accumulation: every step measures, by tensor hooks on the parameters, which the
    # compiled blocks' backward must still call
    for x, y in pairs:
        assert math.isfinite(y["noise_scale"]) and y["noise_scale"] > 0, y
        assert y["noise_scale"] == pytest.approx(x["noise_scale"], rel=1e-3), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3), x["step"]


@pytest.mark.slow
def test_compiled_fsdp2_matches_eager(runs, tmp_path, cache):
    out = tmp_path / "fsdp2"
    _train(out, cache, runs["inductor"], "--train.compile", "true", "--train.engine", "fsdp2")
    _same_losses(runs["eager"], out)


@pytest.mark.slow
def test_profile_steps_write_a_chrome_trace_of_those_steps(runs):
    trace = runs["eager"] / "profile" / "rank0.json"
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"step 2", "step 3"} <= names and not {"step 1", "step 4"} & names
    ops = [e for e in events if e.get("cat") == "cpu_op"]
    assert len(ops) > 100 and any(e["name"] == "aten::mm" for e in ops)
    assert [p.name for p in trace.parent.iterdir()] == ["rank0.json"]  # no temporary file left


def test_compile_model_compiles_each_block_in_place():
    """The blocks are compiled where they are (no wrapper module): parameter names, and so state dicts
    and checkpoints, stay those of the eager model; a model without blocks is compiled whole."""
    for arch in ("llama", "gpt2"):
        model = build_model(ModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2), 64, 16)
        names = [n for n, _ in model.named_parameters()]
        assert compile_model(model) is model
        blocks = model.model.layers if arch == "llama" else model.transformer.h
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert model._compiled_call_impl is None
        assert [n for n, _ in model.named_parameters()] == names
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert compile_model(mlp)._compiled_call_impl is not None

"""The loop, the checkpointer and the callbacks with a fake engine, in one process and in milliseconds.

The engine is a real torch optimizer on one parameter whose "loss" and gradient norm follow a script,
so that what the loop and each callback do with them can be checked exactly: the train records and their
window means, the sync points (one collect per log step, nothing read in between), skipped steps, a
gradient spike, a preemption, the automatic batch schedule's decisions, and a checkpoint that restores
the run's position.
"""

from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bigbatch.data.blocks import PackedData
from bigbatch.distributed import DistInfo
from bigbatch.training.builders import RunSetup, make_plan
from bigbatch.training.callbacks import (BatchSchedule, Checkpointing, Evaluation, GradNormSpike, Preemption,
                                         SkippedSteps, TrainMetrics)
from bigbatch.training.config import load_config
from bigbatch.training.loop import Trainer
from bigbatch.training.run_state import RunStopped
from bigbatch.sharding.training_engine import StepOutput, TrainingEngine

SEQ = 4


class FakeEngine(TrainingEngine):
    """One parameter and torch's SGD; step ``s`` (1-based) reports loss ``losses[s]`` and gradient norm
    ``norms[s]``, and is skipped when the norm is not finite. Saves and loads a JSON file per tag."""

    name, precision = "fake", "fp32"

    def __init__(self, losses=None, norms=None):
        self.module = torch.nn.Linear(1, 1, bias=False)
        self.module.config = SimpleNamespace(vocab_size=8, num_hidden_layers=1, hidden_size=1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.losses, self.norms = losses or {}, norms or {}
        self.steps, self.saved = 0, {}

    def train_step(self, micro_batches, device, after_backward=None, weights=None):
        self.steps += 1
        norm = torch.tensor(self.norms.get(self.steps, 1.0))
        loss = torch.tensor(self.losses.get(self.steps, 5.0), dtype=torch.float64)
        return StepOutput({"loss": loss, "grad_norm": norm}, bool(torch.isfinite(norm)))

    def noise_measurable(self, plan):
        return False

    def noise_probe(self, plan, estimator):  # pragma: no cover - never measurable
        raise AssertionError

    def set_layout(self, plan):
        pass

    def rescale(self, kappa, rule):
        ratio = rule.scale({"lr": self.optimizer.param_groups[0]["lr"]}, kappa)["lr"] / self.optimizer.param_groups[0]["lr"]
        for g in self.optimizer.param_groups:
            g["lr"] *= ratio
        return {"lr_ratios": [ratio], "groups": [{"lr": self.optimizer.param_groups[0]["lr"]}]}

    def save(self, ckpt_dir, *, tag, client_state, keep=None, background=False):
        self.saved[tag] = json.loads(json.dumps(client_state))

    def load(self, ckpt_dir, *, if_unusable="fail", tag=None):
        return (self.saved[max(self.saved)], None) if self.saved else (None, None)

    def load_newest(self, ckpt_dir, tag=None):  # pragma: no cover - load is replaced
        raise AssertionError

    def state_bytes(self):
        return 0

    def export_full_state(self):  # pragma: no cover
        return {}

    def eval_sums(self, batches, device):
        return 4.0 * len(batches), len(batches)


def _trainer(tmp_path, engine, callbacks, overrides=(), steps=10):
    cfg = load_config(None, ["--optim.name", "sgd", "--optim.hparams", "{lr: 0.1}", "--batch.reference_global_batch",
                             "2", "--batch.micro_batch_sizes", "2", "--train.log_every", "5", "--train.max_steps",
                             str(steps), "--train.tokens", "1000000", "--logging.progress", "none",
                             "--logging.tensorboard", "false", "--schedule.kind", "constant", *overrides])
    blocks = np.arange(400, dtype=np.int32).reshape(100, SEQ)
    data = PackedData(train=blocks, val=blocks[:8], path=str(tmp_path), meta={})
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    run = RunSetup(make_plan(cfg, 1), engine.module, engine)
    return Trainer(cfg, str(tmp_path), info, data, SimpleNamespace(description="fake"), run, callbacks=callbacks)


def _records(tmp_path, kind="train"):
    return [r for r in map(json.loads, open(os.path.join(tmp_path, "metrics.jsonl"))) if r["kind"] == kind]


def test_train_records_average_their_window_and_sync_once_per_log_step(tmp_path, monkeypatch):
    engine = FakeEngine(losses={s: float(s) for s in range(1, 11)})
    trainer = _trainer(tmp_path, engine, [TrainMetrics()])
    collects = []
    original = trainer.sync.collect
    monkeypatch.setattr(trainer.sync, "collect", lambda **kw: collects.append(trainer.step) or original(**kw))
    assert trainer.run() == 0
    train = _records(tmp_path)
    assert [r["step"] for r in train] == [5, 10] and collects == [5, 10]
    assert [r["loss"] for r in train] == [3.0, 8.0]  # mean of 1..5 and of 6..10
    assert train[0]["tokens"] == 5 * 2 * SEQ and train[0]["lr"] == pytest.approx(0.1)


def test_skipped_steps_stop_after_the_limit(tmp_path):
    nan = float("nan")
    engine = FakeEngine(norms={3: nan, 6: nan, 7: nan})
    trainer = _trainer(tmp_path, engine, [SkippedSteps(limit=2), TrainMetrics()])
    assert trainer.run() == 3  # RunStopped's exit code, at the sync point after step 7 (log step 10)
    skipped = _records(tmp_path, "skipped_step")
    assert [(r["step"], r["skipped_steps"], r["in_a_row"]) for r in skipped] == [(3, 1, 1), (6, 2, 1), (7, 3, 2)]
    assert [r["skipped_steps"] for r in _records(tmp_path)] == [1]  # the step-5 record; the run stopped at 10


def test_a_gradient_spike_is_found_at_its_step(tmp_path):
    engine = FakeEngine(norms={12: 50.0})
    trainer = _trainer(tmp_path, engine, [GradNormSpike(factor=5.0, warmup=5), TrainMetrics()], steps=15)
    assert trainer.run() == 0
    (spike,) = _records(tmp_path, "grad_spike")
    assert spike["step"] == 12 and spike["grad_norm"] == 50.0 and spike["grad_norm_ema"] == pytest.approx(1.0)


def test_a_signal_saves_and_stops_at_the_next_agreement(tmp_path):
    engine = FakeEngine()
    preemption = Preemption(exit_code=75, every_steps=4, signals=(signal.SIGUSR2,))

    class SignalAt(TrainMetrics):
        def post_step(self, trainer, result):
            super().post_step(trainer, result)
            if trainer.step == 6:
                os.kill(os.getpid(), signal.SIGUSR2)

    trainer = _trainer(tmp_path, engine, [SignalAt(), preemption], steps=20)
    assert trainer.run() == 75
    # agreements at least every 4 steps since the last sync point (the log step 5): at 9
    assert trainer.step == 9 and list(engine.saved) == ["step00000009"]
    state = engine.saved["step00000009"]
    assert state["step"] == 9 and state["samples"] == 18


def test_checkpoint_restores_position_and_callback_state(tmp_path):
    engine = FakeEngine()
    trainer = _trainer(tmp_path, engine, [TrainMetrics(), Checkpointing(every_steps=4, at_end=True)], steps=6)
    assert trainer.run() == 0 and sorted(engine.saved) == ["step00000004", "step00000006"]
    resumed = _trainer(tmp_path, engine, [TrainMetrics()], steps=9)
    resumed.resume_from = str(tmp_path / "checkpoints")
    assert resumed.run() == 0
    assert resumed.step == 9 and resumed.loader.samples_seen == 18
    assert [r["step"] for r in _records(tmp_path)] == [5, 6, 9]  # history kept to step 6, then the resume


def test_auto_schedule_grows_on_patient_measurements(tmp_path):
    engine = FakeEngine()
    cfg_over = ["--batch.schedule", "auto", "--batch.max_global_batch", "8", "--batch.growth_patience", "3",
                "--batch.growth_margin", "1.0", "--batch.micro_batch_sizes", "[2, 1]"]
    trainer = _trainer(tmp_path, engine, [TrainMetrics()], overrides=cfg_over, steps=20)
    schedule = BatchSchedule(trainer.cfg.batch.batch_schedule(), auto=True)
    trainer.callbacks.append(schedule)
    trainer.logger = SimpleNamespace(log=lambda r: None)
    for step, b_noise in enumerate([10.0, 10.0, 1.0, 10.0, 10.0, 10.0], start=1):
        trainer.step = step
        schedule.on_measure(trainer, step, step * 8, b_noise)
    assert trainer.plan.global_batch == 4  # grew once: the streak broke at the third measurement


def test_evaluation_cadence_is_a_sync_point(tmp_path):
    engine = FakeEngine()
    trainer = _trainer(tmp_path, engine, [TrainMetrics(), Evaluation(every_steps=3)], steps=7)
    assert trainer.run() == 0
    assert [r["step"] for r in _records(tmp_path, "eval")] == [3, 6, 7]
    assert _records(tmp_path, "eval")[0]["eval_loss"] == pytest.approx(4.0)

"""The training loop: :class:`Trainer` keeps the run's position and outputs and calls its callbacks.

The Trainer owns the step and the samples seen, the batch plan in force, the learning rates
(:class:`~bigbatch.training.lr_control.LrControl`), the gradient noise scale
(:class:`~bigbatch.training.noise_meter.NoiseMeter`), the checkpointer and the run's outputs (metrics
logger, progress, watchdog). Everything else (train records, evaluation, checkpoints, signals, the batch
schedule, warnings) is a :class:`~bigbatch.training.callbacks.Callback` acting through the Trainer's
commands.

A step reads nothing from the device and makes no collective of bigbatch's own: its metrics stay on
the device in a :class:`~bigbatch.training.step_sync.StepSync` until a sync point (a step at which a
callback asks for one, and the last), where one all-gather and one read bring them to the host.

A batch change and a resume share one path: the engine keeps the hyperparameters and step counters
of the batch it ran (or was saved) at, and :meth:`Trainer.change_batch` moves it to the new batch
(rules for kappa = new / old, step counters by samples). The peak learning rates move by the same
factors and are saved with the checkpoint, so a run that changes its batch at step S and a run
stopped at S and resumed at the new batch compute the same numbers.
"""

from __future__ import annotations

import math
import os
import sys
import time

from bigbatch import distributed as bbdist
from bigbatch.training.builders import RunSetup, lr_schedule, make_plan
from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.checkpointer import Checkpointer
from bigbatch.training.commands import TrainerCommands
from bigbatch.training.config import RunConfig
from bigbatch.data.blocks import GlobalBatchLoader, eval_batches
from bigbatch.training.lr_control import LrControl
from bigbatch.training.metrics import (MetricsLogger, Progress, StepWindow, format_hparams, hparam_fields,
                                       truncate_metrics)
from bigbatch.training.noise_meter import NoiseMeter
from bigbatch.training.run_dir import write_resolved
from bigbatch.training.run_state import RunStopped
from bigbatch.training.step_sync import StepSync
from bigbatch.training.watchdog import Watchdog


class Trainer(TrainerCommands):
    """One run of ``cfg`` in ``out`` on the process group ``info`` with ``callbacks``.

    ``data``: the packed blocks (``corpus``: their source); ``run``: plan, model and engine from
    :func:`bigbatch.training.builders.setup`; ``resume_from``: the checkpoint directory to continue
    from (its newest good tag, or ``resume_tag``; none there starts from step 0); ``data_seed``: the
    order of the training blocks (default ``train.seed``); ``apply_rules``: move the hyperparameters
    by the scaling rules when the batch changes (False keeps them).
    """

    def __init__(self, cfg: RunConfig, out: str, info, data, corpus, run: RunSetup, *, callbacks: list[Callback],
                 resume_from: str | None = None, resume_tag: str | None = None, data_seed: int | None = None,
                 apply_rules: bool = True):
        self.cfg, self.out, self.info, self.data, self.corpus = cfg, out, info, data, corpus
        self.plan, self.model, self.engine = run.plan, run.model, run.engine
        self.callbacks = sorted(callbacks, key=lambda cb: cb.priority)  # stable: equal priorities keep order
        self.apply_rules, self.resume_from, self.resume_tag = apply_rules, resume_from, resume_tag
        self.data_seed = cfg.train.seed if data_seed is None else data_seed
        self.stop_tokens, self.max_steps = cfg.train.tokens, cfg.train.max_steps
        self.loss_weights = None
        self.batch_limit: int | None = None  # the largest global batch a schedule may put in force
        self.lr = LrControl(self.engine, self.plan, lr_schedule(cfg), noise_lr=apply_rules and
                            cfg.batch.noise_lr_on(self.plan.optimizer), every=cfg.batch.decide_every)
        self.window = StepWindow()  # the steps since the last train record and their seconds
        self.hparams = dict(self.plan.hparams)  # group 0's, logged with every record
        self.step, self.skipped = 0, 0
        self.saved_batch = self.plan.global_batch
        self.noise = NoiseMeter(self.engine, every=cfg.train.noise_scale_every, ema=cfg.train.noise_scale_ema,
                                warn_factor=cfg.train.noise_scale_warn_factor)
        self.sync = StepSync(info.device)
        self.synced: dict = {}  # the values of the last sync point that belong in a train record
        self.logger = self.progress = self.watchdog = None
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(self.engine, os.path.join(out, "checkpoints"), self.states(), keep=c.keep,
                                         on_save_error=c.on_save_error, if_unusable=c.if_unusable,
                                         beat=self.beat, warn=self.warn)
        self.last_eval: dict | None = None
        self.exit_code: int | None = None
        self.loader = self._loader(self.plan, 0)
        # the same validation blocks at every batch: built once, at the first micro batch
        self.val = eval_batches(data.val, micro_batch=self.plan.micro_batch, rank=info.rank,
                                world_size=info.world_size, max_blocks=cfg.train.eval_blocks)

    # ------------------------------------------------------------------ position and state

    @property
    def tokens(self) -> int:
        return self.loader.samples_seen * self.data.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.plan.global_batch * self.data.seq_len

    def total_steps(self) -> int:
        """The step at which the run ends: the token budget at the current batch, or max_steps."""
        total = self.step + math.ceil(max(0, self.stop_tokens - self.tokens) / self.tokens_per_step)
        return min(total, self.max_steps) if self.max_steps else total

    def done(self) -> bool:
        return self.step >= self.total_steps()

    def states(self) -> dict:
        """What a checkpoint holds besides the engine, by name."""
        return {"trainer": self, "noise_scale": self.noise,
                **{cb.state_key: cb for cb in self.callbacks if cb.state_key}}

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
                "world_size": self.info.world_size, "global_batch": self.plan.global_batch,
                **self.lr.state_dict(), "hparams": self.hparams, "skipped_steps": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        self.lr.load_state_dict(state)
        self.hparams = dict(state.get("hparams") or self.hparams)
        self.saved_batch = int(state["global_batch"])
        self.loader = self._loader(self.plan, int(state["samples"]))

    # ------------------------------------------------------------------ steps, evaluation, batch

    def _step(self, started: float) -> StepResult:
        measure, after = self.noise.begin(self.step, self.plan)
        out = self.engine.train_step(self.loader.next_step(), self.info.device, after_backward=after,
                                     weights=self.loss_weights)
        self.step += 1
        self.noise.end(measure, out.metrics["grad_norm"], self.step, self.tokens, self.sync)
        seconds = time.perf_counter() - started
        self.window.add(seconds)
        return StepResult(out.metrics, out.applied, self.done(), seconds)

    @property
    def log_step(self) -> bool:
        """Whether the step just taken writes a train record (every ``train.log_every`` and the last)."""
        return self.step % self.cfg.train.log_every == 0 or self.done()

    def sync_point(self) -> None:
        """Bring the recorded values to the host (collective; the train record's only at a log step),
        feed the noise scale, call the callbacks."""
        values, self.synced = self.sync.collect(logged=self.log_step)
        self.engine.settle()
        measured = self.noise.observe(values)
        for cb in self.callbacks:
            if self.exit_code is not None:  # a callback ended the run: the later ones see no more of it
                break
            for step, tokens, b_noise in measured:
                cb.on_measure(self, step, tokens, b_noise)
            cb.on_sync(self, values)
        if self.log_step:
            self.window.reset()

    def evaluate(self) -> dict:
        """Mean cross-entropy (nats/token) over every rank's validation batches, logged."""
        self.beat("evaluation")
        total, count = self.engine.eval_sums(self.val, self.info.device)
        self.beat("evaluation done")
        total, count = bbdist.all_reduce_floats([total, count])
        loss = total / max(count, 1)
        rec = {"kind": "eval", "step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
               "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        for cb in self.callbacks:
            rec.update(cb.eval_fields(self))
        self.log(rec)
        self.say(f"eval step {self.step}: loss {rec['eval_loss']:.4f} | ppl {rec['eval_ppl']:.2f}")
        self.last_eval = rec
        for cb in self.callbacks:
            cb.post_eval(self, rec)
        return rec

    def _loader(self, plan, samples_seen: int) -> GlobalBatchLoader:
        return GlobalBatchLoader(self.data.train, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                                 rank=self.info.rank, world_size=self.info.world_size, seed=self.data_seed,
                                 samples_seen=samples_seen)

    def use_plan(self, plan) -> None:
        """Micro batch and accumulation of ``plan`` for the engine, the data and the noise meter."""
        self.engine.set_layout(plan)
        self.plan = plan
        self.loader = self._loader(plan, self.loader.samples_seen)
        self.noise.use_plan(plan)

    def rescale(self, kappa: float) -> dict:
        """Every hyperparameter by the rule for a batch ``kappa`` times larger (step counters by
        samples), the peak lrs by the same factors; with ``apply_rules`` False nothing moves."""
        if not self.apply_rules:
            return {"kept": True, "groups": [dict(self.hparams)]}
        self.lr.before_rescale()  # the rule scales the values without the noise scale's factor
        report = self.engine.rescale(kappa, self.plan.rule)
        self.lr.after_rescale(report["lr_ratios"])
        self.hparams = {k: report["groups"][0].get(k, v) for k, v in self.hparams.items()}
        return report

    def change_batch(self, new_global_batch: int, *, reason: str = "schedule") -> None:
        """Continue at ``new_global_batch`` from the next step: re-plan micro batch and accumulation,
        rescale from the batch the engine's state belongs to, continue the data at the same sample;
        a ``batch_change`` record says what moved."""
        old = self.saved_batch
        plan = make_plan(self.cfg, self.info.world_size, new_global_batch)
        report = self.rescale(plan.global_batch / old)
        self.use_plan(plan)
        self.saved_batch = plan.global_batch
        _report_batch_change(self, old, report, reason)

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        """Restore, then train to the budget; returns 0, the preemption exit code after a signal (a
        checkpoint is saved first), or the code of a :class:`RunStopped`."""
        client = None
        if self.resume_from is not None:
            client, note = self.checkpointer.restore(self.resume_from, tag=self.resume_tag)
            if note:
                self.say(f"--resume: {note}")
            elif client is None:  # a requeued job that never reached its first checkpoint
                self.say(f"--resume: no complete checkpoint in {self.resume_from}; starting from step 0")
        if self.info.is_main:
            truncate_metrics(os.path.join(self.out, "metrics.jsonl"), self.step)
        log = self.cfg.logging
        self.logger = MetricsLogger(self.out, active=self.info.is_main, tensorboard=log.tensorboard, wandb=log.wandb)
        try:
            if client is not None:  # the engine holds the saved batch's hyperparameters: move them on
                target = self.plan.global_batch
                for cb in self.callbacks:
                    target = cb.resume_batch(self, self.saved_batch, target)
                if target != self.saved_batch:
                    self.change_batch(target, reason="resume")
                elif target != self.plan.global_batch:  # only the micro batch and accumulation differ
                    self.use_plan(make_plan(self.cfg, self.info.world_size, target))
            self.noise.use_plan(self.plan)
            self._fire("on_restore")
            if self.info.is_main:
                self.logger.describe(write_resolved(self))
            self.progress = Progress(log.progress, self.total_steps(), initial=self.step, enabled=self.info.is_main)
            t = self.cfg.train
            self.watchdog = Watchdog(step_timeout_s=t.step_timeout_s, signal_grace_s=self.cfg.checkpoint.signal_grace_s,
                                     rank=self.info.rank, world_size=self.info.world_size)
            self._fire("on_start")
            exit_code = self._loop()
        except RunStopped as exc:
            if self.info.is_main:
                print(str(exc), file=sys.stderr, flush=True)
            exit_code = exc.exit_code
        finally:
            self._fire("close")
            if self.watchdog is not None:
                self.watchdog.close()
            if self.progress is not None:
                self.progress.close()
            self.logger.close()
        bbdist.barrier()
        return exit_code

    def _fire(self, hook: str) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self)

    def _loop(self) -> int:
        while not self.done():
            started = time.perf_counter()
            self._fire("pre_step")
            self.lr.set(self.tokens + self.tokens_per_step, self.plan, self.noise.b_noise)
            result = self._step(started)
            for cb in self.callbacks:
                cb.post_step(self, result)
            if self.log_step or self.lr.wants_sync(self.step) or any(cb.wants_sync(self) for cb in self.callbacks):
                self.sync_point()
            self.beat("training step")
            if self.exit_code is not None:
                return self.exit_code
        self._fire("on_end")
        return 0


def _report_batch_change(trainer: Trainer, old: int, report: dict, reason: str) -> None:
    """A ``batch_change`` record and a line: the batch moved from ``old`` to ``trainer.plan``'s, with the
    hyperparameters ``report`` (the engine's rescale report) says (``reason``: schedule | resume)."""
    plan, noise, peak = trainer.plan, trainer.noise.b_noise, trainer.lr.peak_lrs[0]
    trainer.log({"kind": "batch_change", "reason": reason, "step": trainer.step,
                 "samples": trainer.loader.samples_seen, "tokens": trainer.tokens, "old_global_batch": old,
                 "global_batch": plan.global_batch, "kappa_change": plan.global_batch / old, "kappa": plan.kappa,
                 "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "noise_scale": noise,
                 "lr_peak": peak, "second_moments_rescaled": report.get("second_moments", 0),
                 **hparam_fields(trainer.hparams)})
    moved = ("hyperparameters kept" if report.get("kept") else
             f"rescaled hyperparameters: peak lr {peak:.4g}, {format_hparams(hparam_fields(trainer.hparams))}"
             + (f", second moments / {plan.global_batch / old:g}" if report.get("second_moments") else ""))
    trainer.say(f"{'--resume: ' if reason == 'resume' else ''}batch change at step {trainer.step} ({trainer.tokens:,} "
                f"tokens): global batch {old} -> {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
                f"{trainer.info.world_size} (kappa {plan.kappa:g}; B_noise "
                f"{'not measured' if noise is None else f'{noise:.1f}'}); {moved}")

"""The training loop: :class:`Trainer` keeps the run's position and calls its callbacks.

The Trainer owns what every behaviour reads: the step and the samples seen, the lr of every group
(peak x schedule factor at the tokens seen), the global batch in force and its plan, the gradient
noise scale (:class:`~bigbatch.training.noise_meter.NoiseMeter`) and the run's outputs (metrics
logger, progress, watchdog). Everything else (train records, evaluation, checkpoints, signals, the
batch schedule, warnings) is a :class:`~bigbatch.training.callbacks.Callback`.

A batch change and a resume share one path: the engine keeps the hyperparameters and step counters
of the batch it ran (or was saved) at, and :meth:`Trainer.change_batch` moves it to the new batch
(rules for kappa = new / old, step counters by samples). The peak learning rates move by the same
factors and are saved with the checkpoint, so a run that changes its batch at step S and a run
stopped at S and resumed at the new batch compute the same numbers. ``BIGBATCH_INJECT_NAN_STEPS``
("5,9") poisons the loss of those steps: fault injection for tests.
"""

from __future__ import annotations

import math
import os
import sys

from bigbatch import distributed as bbdist
from bigbatch.scaling.rules import decoupled_decay, noise_lr_factor
from bigbatch.training.builders import RunSetup, lr_schedule, make_plan
from bigbatch.training.callbacks import Callback, StepResult
from bigbatch.training.callbacks.batch_schedule import report_batch_change
from bigbatch.training.checkpointer import Checkpointer
from bigbatch.training.config import RunConfig
from bigbatch.training.data import GlobalBatchLoader, eval_batches
from bigbatch.training.metrics import MetricsLogger, Progress, truncate_metrics
from bigbatch.training.noise_meter import NoiseMeter
from bigbatch.training.run_dir import write_resolved
from bigbatch.training.run_state import RunStopped


class Trainer:
    """One run of ``cfg`` in ``out`` on the process group ``info`` with ``callbacks``.

    ``data``: the packed blocks (``corpus``: their source); ``run``: plan, model and engine from
    :func:`bigbatch.training.builders.setup`; ``resume_from``: the checkpoint directory to continue
    from (its newest good tag, or ``resume_tag``; none there starts from step 0); ``data_seed``: the
    order of the training blocks (default ``train.seed``); ``apply_rules``: move the hyperparameters
    by the scaling rules when the batch changes (False keeps them). Callbacks may set ``stop_tokens``
    (the token budget), ``max_steps`` (a cap on the step count; None: none), ``lr_clock`` (tokens ->
    the tokens at which the lr schedule is read) and ``loss_weights`` (multipliers of this rank's
    micro-batch losses) in :meth:`Callback.on_restore`, and ``batch_limit`` (the largest global batch
    a schedule may put in force; None: any) from :meth:`Callback.resume_batch` on.
    """

    def __init__(self, cfg: RunConfig, out: str, info, data, corpus, run: RunSetup, *, callbacks: list[Callback],
                 resume_from: str | None = None, resume_tag: str | None = None, data_seed: int | None = None,
                 apply_rules: bool = True):
        self.cfg, self.out, self.info, self.data, self.corpus = cfg, out, info, data, corpus
        self.plan, self.model, self.engine = run.plan, run.model, run.engine
        self.callbacks, self.apply_rules = list(callbacks), apply_rules
        self.resume_from, self.resume_tag = resume_from, resume_tag
        self.data_seed = cfg.train.seed if data_seed is None else data_seed
        self.schedule = lr_schedule(cfg)  # in tokens: a batch change changes the step count only
        self.stop_tokens, self.max_steps = cfg.train.tokens, cfg.train.max_steps
        self.lr_clock, self.loss_weights = None, None
        self.batch_limit: int | None = None  # the largest global batch a schedule may put in force
        self.peak_lrs = [g["lr"] for g in self.engine.param_groups]  # the plan's; the schedule multiplies
        self.noise_lr = apply_rules and cfg.batch.noise_lr_on(self.plan.optimizer)
        self.factor_free = self._factor_free()
        self.lr_noise = 1.0  # the noise scale's factor in the lr of the last step
        self.hparams = dict(self.plan.hparams)  # group 0's, logged with every record
        self.step, self.skipped, self.skipped_in_a_row = 0, 0, 0
        self.saved_batch = self.plan.global_batch
        self.noise = NoiseMeter(self.engine, every=cfg.train.noise_scale_every, ema=cfg.train.noise_scale_ema,
                                warn_factor=cfg.train.noise_scale_warn_factor)
        c = cfg.checkpoint
        self.checkpointer = Checkpointer(self.engine, os.path.join(out, "checkpoints"), keep=c.keep,
                                         on_save_error=c.on_save_error, if_unusable=c.if_unusable)
        self.logger = self.progress = self.watchdog = None
        self.last_eval: dict | None = None
        self.exit_code: int | None = None
        self._nan_steps = {int(x) for x in os.environ.get("BIGBATCH_INJECT_NAN_STEPS", "").split(",") if x.strip()}
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

    def stop(self, exit_code: int) -> None:
        """End the run after the current callback (a preemption)."""
        self.exit_code = exit_code

    def states(self) -> dict:
        """What a checkpoint holds besides the engine, by name."""
        return {"trainer": self, "noise_scale": self.noise,
                **{cb.state_key: cb for cb in self.callbacks if cb.state_key}}

    def state_dict(self) -> dict:
        return {"step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
                "world_size": self.info.world_size, "global_batch": self.plan.global_batch,
                "peak_lrs": self.peak_lrs, "factor_free": self.factor_free, "hparams": self.hparams,
                "skipped_steps": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped = int(state["step"]), int(state.get("skipped_steps", 0))
        self.peak_lrs = list(state.get("peak_lrs") or self.peak_lrs)
        # what the checkpoint's groups hold without the factor; a value it did not keep carries no factor
        saved = list(state.get("factor_free") or [])
        now = self._factor_free()
        self.factor_free = [{**d, **(saved[i] if i < len(saved) else {})} for i, d in enumerate(now)]
        self.hparams = dict(state.get("hparams") or self.hparams)
        self.saved_batch = int(state["global_batch"])
        self.loader = self._loader(self.plan, int(state["samples"]))

    # ------------------------------------------------------------------ a step

    def set_lr(self) -> None:
        """lr of every group: its peak x the schedule's factor at the tokens seen by the end of this
        step (so step 1 of a warmup is not lr 0), read at ``lr_clock(tokens)`` when set, x the noise
        scale's factor, which the :meth:`_factor_free` values are given so that it cancels in them."""
        at, plan = self.tokens + self.tokens_per_step, self.plan
        self.lr_noise = noise_lr_factor(plan.optimizer, plan.global_batch, plan.reference_global_batch,
                                        self.noise.b_noise) if self.noise_lr else 1.0
        mult = self.schedule.factor(self.lr_clock(at) if self.lr_clock else at) * self.lr_noise
        for g, peak, free in zip(self.engine.param_groups, self.peak_lrs, self.factor_free):
            g["lr"] = peak * mult
            if "base_lr" in free:
                g["base_lr"] = free["base_lr"] * self.lr_noise
            if "weight_decay" in free:
                g["weight_decay"] = free["weight_decay"] / self.lr_noise

    def _factor_free(self) -> list[dict[str, float]]:
        """Per group, the values that the noise scale's lr factor must not move, at the rule's values:
        AdaBound's ``base_lr`` (its bounds, ``final_lr x lr / base_lr``: a clipped step is SGD's, for which
        the factor is not derived) and a decoupled ``weight_decay`` (the decay ``lr x wd`` per step does
        not involve Adam's second moment). Empty without the noise lr."""
        if not self.noise_lr:
            return [{} for _ in self.engine.param_groups]
        opt = self.plan.optimizer
        return [{**({"base_lr": g["base_lr"]} if "base_lr" in g else {}),
                 **({"weight_decay": g["weight_decay"]} if decoupled_decay(opt, g) else {})}
                for g in self.engine.param_groups]

    def train_step(self) -> StepResult:
        measure, after = self.noise.begin(self.step, self.plan)
        loss, gnorm = self.engine.train_step(self.loader.next_step(), self.info.device, after_backward=after,
                                             poison=self.step + 1 in self._nan_steps, weights=self.loss_weights)
        self.step += 1
        applied = self.engine.step_applied()
        self.skipped += not applied
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        measured = self.noise.end(measure, gnorm)
        return StepResult(loss, gnorm, measured, self.done())

    def evaluate(self) -> dict:
        """Mean cross-entropy (nats/token) over every rank's validation batches, logged."""
        self.watchdog.beat("evaluation", self.step)
        total, count = self.engine.eval_sums(self.val, self.info.device)
        self.watchdog.beat("evaluation done", self.step)
        total, count = bbdist.all_reduce_floats([total, count])
        loss = total / max(count, 1)
        rec = {"kind": "eval", "step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
               "eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
        for cb in self.callbacks:
            rec.update(cb.eval_fields(self))
        self.logger.log(rec)
        self.progress.write(f"eval step {self.step}: loss {rec['eval_loss']:.4f} | ppl {rec['eval_ppl']:.2f}")
        self.last_eval = rec
        for cb in self.callbacks:
            cb.post_eval(self, rec)
        return rec

    # ------------------------------------------------------------------ the global batch

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
        for g, free in zip(self.engine.param_groups, self.factor_free):  # the rule scales the values without the factor
            g.update(free)
        report = self.engine.rescale(kappa, optimizer=self.plan.optimizer, beta_form=self.plan.beta_form,
                                     bound_form=self.plan.bound_form, second_moment=self.plan.second_moment)
        self.peak_lrs = [p * r for p, r in zip(self.peak_lrs, report["lr_ratios"])]
        self.factor_free = [{k: g[k] for k in free} for g, free in zip(self.engine.param_groups, self.factor_free)]
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
        report_batch_change(self, old, report, reason)

    def say(self, text: str) -> None:
        """A line for the user on the main rank (through the progress display once it exists)."""
        if self.progress is not None:
            self.progress.write(text)
            self.progress.set_total(self.total_steps())
        elif self.info.is_main:
            print(text, flush=True)

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        """Restore, then train to the budget; returns 0, the preemption exit code after a signal (a
        checkpoint is saved first), or the code of a :class:`RunStopped`."""
        client, note = (None, None)
        if self.resume_from is not None:
            client, note = self.checkpointer.restore(self.resume_from, self.states(), tag=self.resume_tag)
            if note:
                self.say(f"--resume: {note}")
            elif client is None:  # a requeued job that never reached its first checkpoint
                self.say(f"--resume: no complete checkpoint in {self.resume_from}; starting from step 0")
        if self.info.is_main:
            truncate_metrics(os.path.join(self.out, "metrics.jsonl"), self.step)
        log = self.cfg.logging
        self.logger = MetricsLogger(self.out, active=self.info.is_main, tensorboard=log.tensorboard,
                                    wandb=log.wandb)
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
            self.progress = Progress(self.cfg.logging.progress, self.total_steps(), initial=self.step,
                                     enabled=self.info.is_main)
            self._fire("on_start")
            exit_code = self._loop()
        except RunStopped as exc:
            if self.info.is_main:
                print(str(exc), file=sys.stderr, flush=True)
            exit_code = exc.exit_code
        finally:
            self._fire("close")
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
            self._fire("pre_step")
            self.set_lr()
            result = self.train_step()
            for cb in self.callbacks:
                cb.post_step(self, result)
                if self.exit_code is not None:
                    return self.exit_code
        self._fire("on_end")
        return 0

"""The training loop: steps, the learning-rate schedule in tokens, the global batch and its
schedule, evaluation, logging, checkpoints and preemption, over a
:class:`~bigbatch.training.engine.DeepSpeedRun`.

:class:`Trainer` owns the run's position (steps, samples seen) and everything that follows from it:
the lr of every group (peak x schedule factor at the tokens seen), the global batch in force (a
batch schedule's, changed in place between two steps with every hyperparameter rescaled), the
gradient noise scale, the logging window, and the eval / checkpoint cadence. Its ``run()`` returns
the process exit code.

Reliability: a step whose gradient is NaN or inf changes no state and is counted (``skipped_steps``);
``train.max_skipped_steps`` of them in a row stop the run. A :class:`~bigbatch.training.watchdog.Watchdog`
ends a rank that makes no progress. A save that fails (a full disk) stops the run, or with
``checkpoint.on_save_error: continue`` is recorded and training goes on. ``BIGBATCH_INJECT_NAN_STEPS``
("5,9") poisons the loss of those steps: fault injection for tests.

A batch change and a resume share one path: the engine keeps the hyperparameters and step counters
of the batch it ran (or was saved) at, and :meth:`Trainer.change_batch` moves it to the new batch
with ``DeepSpeedRun.set_batch`` (rules for kappa = new / old, step counters by samples). The peak
learning rates move by the same factors and are saved with the checkpoint, so a run that changes
its batch at step S and a run stopped at S and resumed at the new batch compute the same numbers.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

from bigbatch import distributed as bbdist
from bigbatch import exit_codes
from bigbatch.data.mixture import source_fields
from bigbatch.training.config import RunConfig, dump_yaml
from bigbatch.training.data import GlobalBatchLoader, eval_batches
from bigbatch.training.engine import RunSetup, lr_schedule, make_plan
from bigbatch.training.metrics import MetricsLogger, Progress, plot_losses, truncate_metrics
from bigbatch.training.model import count_parameters
from bigbatch.training.watchdog import Watchdog


class RunStopped(Exception):
    """The run cannot go on; every rank raises it at the same point. ``exit_code``: the process's."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code


class StopFlag:
    """Set by SIGTERM/SIGUSR1; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum


def hparam_fields(hparams: dict) -> dict:
    """The scaled constants beside lr, as flat record fields (``betas`` -> ``beta1``, ``beta2``)."""
    out = {}
    for k, v in hparams.items():
        if isinstance(v, (list, tuple)):
            out.update({f"beta{i + 1}" if k == "betas" else f"{k}_{i}": x for i, x in enumerate(v)})
        elif k != "lr" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


class Trainer:
    """One run of ``cfg`` in ``out`` on the process group ``info`` (see the module docstring).

    Args:
        cfg: the run config.
        out: the run directory (metrics.jsonl, checkpoints/, ...).
        info: :class:`bigbatch.distributed.DistInfo` of this process.
        data: the packed blocks (:class:`~bigbatch.training.data.PackedData`); ``corpus``: its source.
        run: plan, model and engine from :func:`bigbatch.training.engine.setup`.
        resuming: continue from the latest good checkpoint in ``out/checkpoints`` if there is one.
        load_from: with ``resuming``, the checkpoint directory to start from instead (a branch of
            another run: :mod:`bigbatch.training.check_rules`); this run saves into its own.
        data_seed: the order of the training blocks (default ``train.seed``, which also seeds the
            model's initialisation).
    """

    def __init__(self, cfg: RunConfig, out: str, info, data, corpus, run: RunSetup, *, resuming: bool,
                 load_from: str | None = None, data_seed: int | None = None):
        self.cfg, self.out, self.info, self.data, self.corpus = cfg, out, info, data, corpus
        self.plan, self.model, self.engine = run.plan, run.model, run.engine
        self.ckpt_dir = os.path.join(out, "checkpoints")
        self.data_seed = cfg.train.seed if data_seed is None else data_seed
        self.schedule = lr_schedule(cfg)  # in tokens: a batch change changes the step count only
        self.batch_schedule = cfg.batch.batch_schedule()
        self.peak_lrs = [g["lr"] for g in self.engine.param_groups]  # the plan's; the schedule multiplies
        self.hparams = dict(self.plan.hparams)  # group 0's, logged with every record
        self.step = 0
        self.logger: MetricsLogger | None = None
        self.progress: Progress | None = None
        self.last_eval: dict | None = None
        self.past_critical = False
        self.skipped, self.skipped_in_a_row = 0, 0
        self._nan_steps = {int(x) for x in os.environ.get("BIGBATCH_INJECT_NAN_STEPS", "").split(",") if x.strip()}
        self.watchdog: Watchdog | None = None
        source = load_from or self.ckpt_dir
        client, note = self.engine.load(source, if_unusable=cfg.checkpoint.if_unusable) if resuming else (None, None)
        if note and info.is_main:
            print(f"--resume: {note}", flush=True)
        samples = 0
        if client is not None:
            self.step, samples = int(client["step"]), int(client["samples"])
            self.skipped = int(client.get("skipped_steps", 0))
            self.peak_lrs = list(client.get("peak_lrs") or self.peak_lrs)
            self.hparams = dict(client.get("hparams") or self.hparams)
            if client.get("batch_schedule") and self.batch_schedule is not None:
                self.batch_schedule.load_state_dict(client["batch_schedule"])
        elif resuming and info.is_main:  # a requeued job that never reached its first checkpoint
            print(f"--resume: no complete checkpoint in {source}; starting from step 0", flush=True)
        self.loader = GlobalBatchLoader(data.train, micro_batch=self.plan.micro_batch, grad_accum=self.plan.grad_accum,
                                        rank=info.rank, world_size=info.world_size, seed=self.data_seed,
                                        samples_seen=samples)
        # the same validation blocks at every batch: built once, at the first micro batch
        self.val = eval_batches(data.val, micro_batch=self.plan.micro_batch, rank=info.rank,
                                world_size=info.world_size, max_blocks=cfg.train.eval_blocks)
        self.probe = None
        self._noise_state = client.get("noise_scale") if client is not None else None
        self.stop = StopFlag()
        if client is not None:  # the engine holds the saved batch's hyperparameters: move them on
            saved = client["global_batch"]
            target = self._batch_in_force(saved, self.plan.global_batch)
            if target != saved:
                self.change_batch(target, from_global_batch=saved, log=False)
            elif target != self.plan.global_batch:  # only the micro batch and accumulation differ
                self._use_plan(make_plan(cfg, info.world_size, target))
        self._ensure_probe()

    # ------------------------------------------------------------------ position

    @property
    def seq_len(self) -> int:
        return self.data.seq_len

    @property
    def tokens(self) -> int:
        return self.loader.samples_seen * self.seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.plan.global_batch * self.seq_len

    def total_steps(self) -> int:
        """The step at which the run ends: the token budget at the current batch, or max_steps."""
        left = max(0, self.cfg.train.tokens - self.tokens)
        total = self.step + math.ceil(left / self.tokens_per_step)
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    def done(self) -> bool:
        return self.step >= self.total_steps()

    # ------------------------------------------------------------------ parts of a step

    def _batch_in_force(self, saved: int, planned: int) -> int:
        """The global batch a resumed run continues with: the fixed schedule's at the tokens seen, an
        automatic schedule's as saved, else the plan's (the run config's policy on this world size)."""
        if self.batch_schedule is None:
            return planned
        if self.cfg.batch.schedule == "auto":
            return saved
        return self.batch_schedule.batch_at(self.tokens)

    def noise_every(self) -> int:
        """Steps between noise-scale measurements at the current batch (0: none). By default every
        step whose batch has >= 2 micro batches over all ranks, where it costs one norm per micro
        batch; an explicit ``train.noise_scale_every`` or an automatic schedule plans for >= 2."""
        every = self.cfg.train.noise_scale_every
        if every == 0 or not self.engine.noise_measurable(self.plan):
            return 0
        return every or 1

    def _ensure_probe(self) -> None:
        """Gradient noise scale: per-micro-batch gradients (hooks) against the step's reduced one."""
        if self.probe is not None or not self.noise_every():
            return
        from bigbatch.scaling.noise_scale import GradientNoiseScale

        self.probe = self.engine.noise_probe(self.plan, GradientNoiseScale(
            ema_decay=self.cfg.train.noise_scale_ema, warn_factor=self.cfg.train.noise_scale_warn_factor))
        if self._noise_state:
            self.probe.estimator.load_state_dict(self._noise_state)  # the EMA continues across a resume

    @property
    def noise_scale(self) -> float | None:
        """The smoothed gradient noise scale ``B_noise`` (samples), once measured."""
        return self.probe.estimator.b_noise if self.probe is not None else None

    def lr_factor(self) -> float:
        """The schedule's factor at the tokens seen by the end of this step (so step 1 of a warmup is
        not lr 0)."""
        return self.schedule.factor(self.tokens + self.tokens_per_step)

    def set_lr(self) -> None:
        """lr of every group: its peak x :meth:`lr_factor`."""
        mult = self.lr_factor()
        for g, peak in zip(self.engine.param_groups, self.peak_lrs):
            g["lr"] = peak * mult

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step: (mean loss on this rank, gradient norm, whether the noise scale was
        measured)."""
        every = self.noise_every()
        measure = every > 0 and self.step % every == 0
        after = None
        if self.probe is not None:  # record this micro batch's gradient for the noise scale, or drop it
            def after():
                self.probe.after_backward(measure)
        loss, gnorm = self.engine.train_step(self.loader.next_step(), self.info.device, after_backward=after,
                                             poison=self.step + 1 in self._nan_steps, weights=self.loss_weights())
        self.step += 1
        self._count_skip(gnorm)
        measured = measure and math.isfinite(gnorm)
        if measured:
            self.probe.step_done(global_sq_norm=gnorm**2)
        elif measure:
            self.probe.skip_step()
        return loss, gnorm, measured

    def loss_weights(self) -> list[float] | None:
        """Multipliers of this rank's micro-batch losses in the next step (None: all 1); a gradient
        transform such as SVAG (:mod:`bigbatch.scaling.svag`) sets them."""
        return None

    def eval_due(self) -> bool:
        """Whether to evaluate after this step (``train.eval_every`` steps; not at the last step, which
        is always evaluated)."""
        every = self.cfg.train.eval_every
        return bool(every) and self.step % every == 0

    def _count_skip(self, gnorm: float) -> None:
        """A step whose gradient was not finite was skipped by the engine (no state changed): count it,
        and stop after ``train.max_skipped_steps`` in a row (fp16: DeepSpeed's loss scaler skips while it
        searches its scale, and stops the run itself at the smallest scale)."""
        if self.engine.step_applied():
            self.skipped_in_a_row = 0
            return
        self.skipped += 1
        self.skipped_in_a_row += 1
        msg = (f"step {self.step}: gradient norm {gnorm} is not finite; the optimizer step was skipped "
               f"({self.skipped_in_a_row} in a row, {self.skipped} in all)")
        self.logger.log({"kind": "skipped_step", "step": self.step, "tokens": self.tokens, "grad_norm": gnorm,
                         "skipped_steps": self.skipped, "in_a_row": self.skipped_in_a_row})
        self.progress.write(f"warning: {msg}")
        limit = self.cfg.train.max_skipped_steps
        if self.skipped_in_a_row >= limit and self.engine.precision != "fp16":
            raise RunStopped(exit_codes.NOT_FINITE,
                             f"error: {limit} optimizer steps in a row had non-finite gradients (train.max_skipped_steps"
                             f"={limit}); stopping at step {self.step}. The weights are those of step "
                             f"{self.step - limit}; resume from the last checkpoint with a lower lr or inspect the data")

    def check_critical_batch(self) -> None:
        """Warn once per crossing when the global batch exceeds ``warn_factor`` x B_noise: past the
        critical batch the scaling rules no longer hold."""
        factor = self.cfg.train.noise_scale_warn_factor
        past = self.noise_scale is not None and self.plan.global_batch > factor * self.noise_scale
        if past and not self.past_critical:
            msg = (f"warning: global batch {self.plan.global_batch} exceeds {factor:g} x the measured gradient "
                   f"noise scale B_noise={self.noise_scale:.1f}: past the critical batch the scaling rules do not "
                   "hold and a larger batch will not train proportionally faster")
            self.logger.log({"kind": "warning", "step": self.step, "tokens": self.tokens,
                             "global_batch": self.plan.global_batch, "noise_scale": self.noise_scale, "message": msg})
            self.progress.write(msg)
        self.past_critical = past

    def follow_batch_schedule(self, measured: bool) -> None:
        """Between two steps: put the batch schedule's batch in force. An automatic schedule decides
        on each noise-scale measurement."""
        if self.batch_schedule is None:
            return
        if self.cfg.batch.schedule == "auto":
            if not measured:
                return
            new = self.batch_schedule.next_batch(self.tokens, self.plan.global_batch, self.noise_scale)
        else:
            new = self.batch_schedule.batch_at(self.tokens)
        if new != self.plan.global_batch:
            self.change_batch(new)

    def _use_plan(self, plan) -> None:
        """Micro batch and accumulation of ``plan`` for the engine, the data and the noise probe."""
        self.engine.set_layout(plan)
        self.plan = plan
        self.loader = GlobalBatchLoader(self.data.train, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum,
                                        rank=self.info.rank, world_size=self.info.world_size, seed=self.data_seed,
                                        samples_seen=self.loader.samples_seen)
        if self.probe is not None:
            self.probe.set_batch(plan.micro_batch, plan.grad_accum)
        self._ensure_probe()

    def change_batch(self, new_global_batch: int, *, from_global_batch: int | None = None, log: bool = True) -> None:
        """Continue at ``new_global_batch`` from the next step: re-plan micro batch and accumulation,
        apply it to the live engine with every hyperparameter rescaled (kappa = new / old) and the
        step counters converted by samples, move the peak lrs by the same factors, and continue the
        data stream at the same sample. ``from_global_batch``: the batch the engine's state belongs
        to (default: the one in force)."""
        old_batch = self.plan.global_batch if from_global_batch is None else from_global_batch
        plan = make_plan(self.cfg, self.info.world_size, new_global_batch)
        report = self.rescale(plan, old_batch)
        self._use_plan(plan)
        if not log:  # a resume: the loop's outputs do not exist yet
            if self.info.is_main:
                moved = ("hyperparameters and step counters kept" if report.get("kept") else
                         f"rescaled hyperparameters {report['groups'][0]}; step counters x "
                         f"{old_batch / plan.global_batch:g}")
                print(f"--resume: global batch {old_batch} -> {plan.global_batch} (kappa {plan.global_batch / old_batch:g}"
                      f" vs the checkpoint); {moved}", flush=True)
            return
        rec = {"kind": "batch_change", "step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
               "old_global_batch": old_batch, "global_batch": plan.global_batch,
               "kappa_change": plan.global_batch / old_batch, "kappa": plan.kappa,
               "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "noise_scale": self.noise_scale,
               "lr_peak": self.peak_lrs[0], **hparam_fields(self.hparams)}
        self.logger.log(rec)
        self.progress.set_total(self.total_steps())
        noise = f"{self.noise_scale:.1f}" if self.noise_scale is not None else "not measured"
        self.progress.write(f"batch change at step {self.step} ({self.tokens:,} tokens): global batch "
                            f"{old_batch} -> {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
                            f"{self.info.world_size} (kappa {plan.kappa:g}; B_noise {noise}); "
                            f"peak lr {self.peak_lrs[0]:.4g}, {hparam_fields(self.hparams)}")

    def rescale(self, plan, from_global_batch: float) -> dict:
        """Every hyperparameter of the engine by the rule for kappa = ``plan.global_batch`` /
        ``from_global_batch`` (step counters by samples), and the peak lrs by the same factors.
        Returns the engine's report."""
        report = self.engine.rescale(plan, from_global_batch)
        self.peak_lrs = [p * r for p, r in zip(self.peak_lrs, report["lr_ratios"])]
        self.hparams = {k: report["groups"][0].get(k, v) for k, v in self.hparams.items()}
        return report

    def evaluate(self) -> dict:
        """Mean cross-entropy (nats/token) over every rank's validation batches, logged."""
        self.watchdog.beat("evaluation", self.step)
        total, count = self.engine.eval_sums(self.val, self.info.device)
        self.watchdog.beat("evaluation done", self.step)
        total, count = bbdist.all_reduce_floats([total, count])
        eval_loss = total / max(count, 1)
        rec = {"kind": "eval", "step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
               "eval_loss": eval_loss, "eval_ppl": math.exp(min(eval_loss, 50.0))}
        rec.update(source_fields(self.engine, self.data, self.loader.samples_seen, self.plan.micro_batch, self.info,
                                 self.cfg.train.eval_blocks))  # eval_loss/<source>, tokens/<source> of a mixture
        self.logger.log(rec)
        self.progress.write(f"eval step {self.step}: loss {eval_loss:.4f} | ppl {rec['eval_ppl']:.2f}")
        self.last_eval = rec
        return rec

    def save(self, *, periodic: bool = False) -> bool:
        """Save a checkpoint (collective). False: a periodic save failed and
        ``checkpoint.on_save_error`` is ``continue`` (recorded); otherwise a failed save stops the run."""
        from bigbatch.sharding import CheckpointSaveError
        from bigbatch.sharding import tags

        warning = tags.space_warning(self.ckpt_dir, tags.expected_bytes(self.ckpt_dir) or self.engine.state_bytes())
        if warning:
            self.logger.log({"kind": "warning", "step": self.step, "tokens": self.tokens, "message": warning})
            self.progress.write(f"warning: {warning}")
        self.watchdog.beat("checkpoint save", self.step)
        try:
            self._save()
        except CheckpointSaveError as exc:
            if periodic and self.cfg.checkpoint.on_save_error == "continue":
                self.logger.log({"kind": "checkpoint_error", "step": self.step, "tokens": self.tokens,
                                 "message": str(exc)})
                self.progress.write(f"warning: {exc} Training continues (checkpoint.on_save_error: continue).")
                return False
            raise RunStopped(exit_codes.SAVE_FAILED, f"error: {exc}") from None
        self.watchdog.beat("checkpoint saved", self.step)
        return True

    def _save(self) -> None:
        state = {"step": self.step, "samples": self.loader.samples_seen, "tokens": self.tokens,
                 "world_size": self.info.world_size, "global_batch": self.plan.global_batch,
                 "peak_lrs": self.peak_lrs, "hparams": self.hparams,
                 "batch_schedule": self.batch_schedule.state_dict() if self.batch_schedule is not None else None,
                 "noise_scale": self.probe.estimator.state_dict() if self.probe is not None else self._noise_state,
                 "skipped_steps": self.skipped}
        self.engine.save(self.ckpt_dir, tag=f"step{self.step:08d}", client_state=state, keep=self.cfg.checkpoint.keep)

    # ------------------------------------------------------------------ the run

    def _write_resolved(self) -> None:
        plan, info = self.plan, self.info
        resolved = {
            "world_size": info.world_size, "backend": info.backend,
            "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(plan).items()
                     if k not in ("hparams", "reference_hparams", "optimizer_class")},
            "scaled_hparams": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.hparams.items()},
            "tokens_per_step": self.tokens_per_step, "total_steps": self.total_steps(),
            "parameters": count_parameters(self.model), "vocab_size": self.model.config.vocab_size,
            "corpus": self.corpus.description, "data_cache": self.data.path, "train_blocks": int(len(self.data.train)),
            "val_blocks": int(len(self.data.val)), "precision": self.engine.precision,
            "engine": self.engine.name, "zero_stage": self.engine.zero_stage,
        }
        dump_yaml({**self.cfg.to_dict(), "resolved": resolved}, os.path.join(self.out, "config.resolved.yaml"))
        print(f"bigbatch: {count_parameters(self.model) / 1e6:.2f}M params | {info.world_size} proc(s) "
              f"| global batch {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
              f"{info.world_size} (kappa {plan.kappa:g}) | {self.cfg.optim.name} {plan.hparams} | "
              f"steps {self.step}->{self.total_steps()} | corpus {self.corpus.description}", flush=True)

    def run(self) -> int:
        """Train to the token budget (or max_steps); returns 0, the preemption exit code after a
        signal (a checkpoint is saved first), or the code of a :class:`RunStopped`."""
        cfg = self.cfg
        if self.info.is_main:
            truncate_metrics(os.path.join(self.out, "metrics.jsonl"), self.step)
            self._write_resolved()
        self.logger = MetricsLogger(self.out, active=self.info.is_main, tensorboard=cfg.logging.tensorboard)
        self.progress = Progress(cfg.logging.progress, self.total_steps(), initial=self.step, enabled=self.info.is_main)
        self.watchdog = Watchdog(step_timeout_s=cfg.train.step_timeout_s, signal_grace_s=cfg.checkpoint.signal_grace_s,
                                 rank=self.info.rank, world_size=self.info.world_size)
        try:
            exit_code = self._loop()
        except RunStopped as exc:
            if self.info.is_main:
                print(str(exc), file=sys.stderr, flush=True)
            exit_code = exc.exit_code
        finally:
            self.watchdog.close()
            self.progress.close()
            self.logger.close()
        bbdist.barrier()
        return exit_code

    def _loop(self) -> int:
        cfg, main = self.cfg, self.info.is_main
        window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
        while not self.done():
            self.set_lr()
            step_loss, gnorm, measured = self.train_step()
            self.watchdog.beat("training step", self.step)
            window_loss += step_loss
            window_steps += 1
            last = self.done()
            record = None
            if self.step % cfg.train.log_every == 0 or last:
                # AdaBound's bounds: the share of coordinates clipped (each rank counts its shard)
                counts = list(self.engine.optimizer.bound_counts()) if hasattr(self.engine.optimizer,
                                                                              "bound_counts") else []
                sums = bbdist.all_reduce_floats([window_loss, *counts])
                mean_loss = sums[0] / (self.info.world_size * window_steps)
                elapsed = time.perf_counter() - window_start - paused  # eval/checkpoint time left out
                record = {"kind": "train", "step": self.step, "samples": self.loader.samples_seen,
                          "tokens": self.tokens, "loss": mean_loss, "lr": self.engine.param_groups[0]["lr"],
                          **hparam_fields(self.hparams), "global_batch": self.plan.global_batch,
                          "kappa": self.plan.kappa, "grad_norm": gnorm, "skipped_steps": self.skipped,
                          "tokens_per_s": window_steps * self.tokens_per_step / elapsed if elapsed > 0 else float("nan")}
                if self.noise_scale is not None:
                    record["noise_scale"] = self.noise_scale  # samples (EMA, bias-corrected)
                if counts and sums[3] > 0:
                    record["clipped_lower"], record["clipped_upper"] = sums[1] / sums[3], sums[2] / sums[3]
                self.logger.log(record)
                window_loss, window_steps, window_start, paused = 0.0, 0, time.perf_counter(), 0.0
            self.progress.update(self.step, record)
            if measured:
                self.check_critical_batch()

            pause_start = time.perf_counter()
            if not last and self.eval_due():
                self.evaluate()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0 and not last:
                self.save(periodic=True)
            if bbdist.any_rank(self.stop.signum is not None):
                self.watchdog.reached_save_point()
                self.save()
                if main:
                    self.progress.write(f"signal received: checkpoint saved at step {self.step} in {self.ckpt_dir}; "
                                        f"exiting with code {cfg.checkpoint.preempt_exit_code} "
                                        f"(resume with --resume {self.out})")
                return cfg.checkpoint.preempt_exit_code
            if not last:
                self.follow_batch_schedule(measured)
            paused += time.perf_counter() - pause_start

        if self.last_eval is None or self.last_eval["step"] != self.step:
            self.evaluate()
        if cfg.checkpoint.at_end:
            self.save()
        if main:
            ev = self.last_eval
            msg = f"final eval: loss {ev['eval_loss']:.4f} | perplexity {ev['eval_ppl']:.2f} | step {self.step}"
            if cfg.logging.plot:
                batch = (f"global batch {self.plan.global_batch}" if self.batch_schedule is None
                         else f"batch schedule {cfg.batch.schedule}")
                png = plot_losses(os.path.join(self.out, "metrics.jsonl"), os.path.join(self.out, "loss.png"),
                                  title=f"{cfg.model.arch} {cfg.optim.name}, {batch}")
                msg += f"\nloss curves: {png}"
            print(msg + f"\nmetrics: {os.path.join(self.out, 'metrics.jsonl')}", flush=True)
        return 0

"""Trainer callbacks for bigbatch's batch-size scaling: the rules before the optimizer is built
(:class:`ScalingRulesCallback`) and a batch schedule during training (:class:`BatchScheduleCallback`).

The user gives the hyperparameters tuned at ``reference_batch_size`` (global samples per optimizer
step) in the usual training arguments. At the end of ``Trainer.__init__`` (``on_init_end``; the
optimizer is built later, in ``train``) the callback reads the run's global batch = world size x
``per_device_train_batch_size`` x ``gradient_accumulation_steps``, plans it with
:func:`bigbatch.scaling.plan_batch` (policy ``"scale"``), and writes the scaled values back into the
arguments: ``learning_rate``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay``
(decoupled decay only), ``optim_args`` (``final_lr``, ``gamma``), and the step counts ``max_steps`` and
integer ``warmup_steps`` (divided by kappa: same samples). It logs them and keeps them in
:attr:`ScalingRulesCallback.applied`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from bigbatch.hf.optim import format_optim_args, optimizer_cls_and_kwargs, parse_optim_args, short_name
from bigbatch.optim.registry import get_optimizer_class
from bigbatch.scaling.batch_schedule import AutoBatchSchedule, BatchScheduleError, FixedBatchSchedule
from bigbatch.scaling.noise_scale import GradientNoiseScale, NoiseScaleProbe
from bigbatch.scaling.planner import plan_batch
from bigbatch.scaling.rescale import rescale_optimizer
from bigbatch.scaling.rules import ScalingRule, rule_for, scale_steps
from bigbatch.training.metrics import hparam_fields

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedScaling:
    """What the callback changed: the plan, and the reference and scaled constructor kwargs."""

    optimizer: str
    world_size: int
    global_batch: int
    reference_global_batch: int
    kappa: float
    reference: dict
    scaled: dict
    max_steps: tuple[int, int]  # (reference, scaled)
    warmup_steps: tuple[float, float]


class ScalingRulesCallback(TrainerCallback):
    """Scale the optimizer hyperparameters from ``reference_batch_size`` to the run's global batch.

    Args:
        optimizer: name or class; default ``args.bigbatch_optim`` (set by ``BigBatchTrainingArguments``).
        reference_batch_size: global batch the arguments were tuned at; default ``args.reference_batch_size``.
        rule: a :class:`~bigbatch.scaling.rules.ScalingRule` whose forms to use (or ``forms``: ``beta_form``
            and the others by name, for :func:`~bigbatch.scaling.rules.rule_for`); ``overrides``: values that
            replace the scaled ones.
    """

    def __init__(self, optimizer=None, reference_batch_size: int | None = None, *, rule: ScalingRule | None = None,
                 overrides: dict | None = None, **forms):
        self.optimizer = optimizer
        self.reference_batch_size = reference_batch_size
        self.forms = rule.forms() if rule is not None else rule_for("adam", **forms).forms()  # checked now
        self.overrides = overrides
        self.applied: AppliedScaling | None = None

    def on_init_end(self, args, state, control, **kwargs):
        self.apply(args)

    def apply(self, args) -> AppliedScaling:
        if getattr(args, "_bigbatch_scaled", False):
            raise RuntimeError("ScalingRulesCallback: these TrainingArguments were already scaled once; build new "
                               "arguments (at the reference batch) for a new Trainer")
        name = self.optimizer or getattr(args, "bigbatch_optim", None)
        if name is None:
            raise ValueError("ScalingRulesCallback: no optimizer; pass optimizer= or use BigBatchTrainingArguments(optim=...)")
        ref = self.reference_batch_size or getattr(args, "reference_batch_size", None)
        if ref is None:
            raise ValueError("reference_batch_size: required to scale (the global batch the hyperparameters were tuned at)")
        cls = get_optimizer_class(name)
        _, kwargs = optimizer_cls_and_kwargs(cls, args)
        reference = {**kwargs, "weight_decay": args.weight_decay}
        per_device = args.per_device_train_batch_size
        plan = plan_batch(args.world_size, [per_device], reference_global_batch=ref, optimizer=cls,
                          hparams=reference, policy="scale",
                          per_device_batch=per_device * args.gradient_accumulation_steps,
                          rule=rule_for(cls, **self.forms), overrides=self.overrides)
        scaled = plan.hparams
        extra = parse_optim_args(args.optim_args, cls)
        args.learning_rate = scaled["lr"]
        if "betas" in scaled:
            args.adam_beta1, args.adam_beta2 = scaled["betas"]
        if "eps" in scaled:
            args.adam_epsilon = scaled["eps"]
        args.weight_decay = scaled["weight_decay"]
        extra.update({k: v for k, v in scaled.items() if k in extra or k in ("final_lr", "gamma")})
        args.optim_args = format_optim_args(extra) or None
        max_steps = (args.max_steps, scale_steps(args.max_steps, plan.kappa) if args.max_steps > 0 else args.max_steps)
        args.max_steps = max_steps[1]
        warm = args.warmup_steps
        warmup = (warm, scale_steps(int(warm), plan.kappa) if warm >= 1 else warm)  # a ratio (< 1) needs nothing
        args.warmup_steps = warmup[1]
        args._bigbatch_scaled = True
        self.applied = AppliedScaling(short_name(cls), plan.world_size, plan.global_batch, ref, plan.kappa,
                                      reference, scaled, max_steps, warmup)
        if args.process_index == 0:
            logger.warning("bigbatch scaling: %s at global batch %d = %d proc x %d x %d accum (reference %d, kappa=%.6g): "
                           "%s -> %s; max_steps %s -> %s; warmup_steps %s -> %s", self.applied.optimizer,
                           plan.global_batch, plan.world_size, per_device, args.gradient_accumulation_steps, ref,
                           plan.kappa, reference, scaled, *max_steps, *warmup)
        return self.applied


class BatchScheduleCallback(TrainerCallback, ExportableState):
    """Follow a global-batch schedule in the HF Trainer through gradient accumulation, rescaling the
    live optimizer by the scaling rules at every change.

    Args:
        schedule: ``[[samples, global_batch], ...]`` (piecewise constant from each sample count on,
            the first at 0), as :class:`bigbatch.scaling.batch_schedule.FixedBatchSchedule`; or
            ``"auto"`` with ``auto`` the keyword arguments of
            :class:`bigbatch.scaling.batch_schedule.AutoBatchSchedule` (``maximum`` required; ``start``
            defaults to the run's first global batch, ``min_gap`` in samples to the lr warmup).
        optimizer: the scaling rule's optimizer (default: ``args.bigbatch_optim``, else the
            optimizer's class).
        forms: the scaling rule's choices by name (``beta_form`` and the others of
            :class:`~bigbatch.scaling.rules.ScalingRule`), for :func:`~bigbatch.scaling.rules.rule_for`.
        noise_ema: EMA coefficient of the noise-scale estimator (``auto``).

    Every batch must be ``world size x per_device_train_batch_size x accumulation``; the run must
    start at the schedule's first batch (set ``gradient_accumulation_steps`` to match). At a change
    the callback sets ``args.gradient_accumulation_steps`` (the Trainer reads it for every optimizer
    step), rescales every parameter group (lr through the scheduler's base lrs, betas, eps,
    decoupled weight decay, AdaBound's final_lr and gamma), divides the optimizer's step counters by
    kappa and carries its second moments to the new batch. The lr schedule and the run's length
    follow samples: the scheduler reads its step as samples / the first batch (its warmup and decay
    stay where they were in samples) and ``max_steps`` becomes the steps left at the new batch for
    the samples left. The Trainer counts micro batches per epoch and syncs gradients every
    ``gradient_accumulation_steps`` of them, so a change waits for the first step boundary at which
    the micro batches of the epoch so far are a multiple of the new accumulation (at most one step
    at the new batch's samples late).

    ``auto`` measures the gradient noise scale B_noise every step with >= 2 micro batches over all
    ranks (:class:`bigbatch.scaling.noise_scale.NoiseScaleProbe`: each micro batch's gradient on
    each rank before DDP's all-reduce against the step's reduced gradient, the Trainer's pre-clip
    norm) and grows the batch as :class:`~bigbatch.scaling.batch_schedule.AutoBatchSchedule` says.
    Its decisions and changes go to the Trainer's log (``batch_decision/*`` and ``batch_change/*``
    keys: ``state.log_history`` and the reporters). DeepSpeed engines keep their own accumulation
    (refused here; train.py changes batches under DeepSpeed); the data order is the Trainer's. The
    position, the schedule's and the estimator's state are saved with Trainer checkpoints
    (``ExportableState``) and a resume continues them.
    """

    def __init__(self, schedule, optimizer=None, *, auto: dict | None = None, noise_ema: float = 0.99, **forms):
        self.auto = dict(auto or {}) if schedule == "auto" else None
        if self.auto is not None:
            if "maximum" not in self.auto:
                raise BatchScheduleError("batch_schedule auto: max_global_batch is required")
            self.schedule = None  # built at the start of training: the start batch is the run's
        else:
            self.schedule = schedule if isinstance(schedule, FixedBatchSchedule) else FixedBatchSchedule(schedule,
                                                                                                         "samples")
        self.optimizer = optimizer
        self.forms = rule_for(optimizer or "adam", **forms).forms()  # checked now, applied to the run's optimizer
        self.noise_ema = noise_ema
        self.samples = 0
        self.global_batch: int | None = None
        self.micro_in_epoch = 0
        self.epochs_done = 0
        self.resuming = False  # the first epoch of a resume continues its micro-batch count
        self.micro_in_step = 0
        self.pending: int | None = None  # a growth decided, waiting for a step boundary the Trainer allows
        self.history: list[list[int]] = []  # [step, samples, global batch] at the start and every change
        self.first_max_steps: int | None = None
        self.changes: list[dict] = []
        self.probe: NoiseScaleProbe | None = None
        self.trainer = None  # set by BigBatchTrainer: logs go through Trainer.log
        self._reason = None
        self._schedule_state: dict = {}
        self._noise_state: dict | None = None
        self._measured = False  # the last step fed the noise scale

    # ---- checkpointed state (ExportableState: args rebuild, attributes are set back) ----

    def state(self) -> dict:
        sched = "auto" if self.auto is not None else [list(e) for e in self.schedule.entries]
        return {"args": {"schedule": sched, "optimizer": self.optimizer if isinstance(self.optimizer, str) else None,
                         **self.forms, "auto": self.auto, "noise_ema": self.noise_ema},
                "attributes": {"samples": self.samples, "global_batch": self.global_batch,
                               "micro_in_epoch": self.micro_in_epoch, "epochs_done": self.epochs_done, "pending": self.pending,
                               "history": self.history, "first_max_steps": self.first_max_steps,
                               "schedule_state": self.schedule_state, "noise_state": self.noise_state}}

    @property
    def schedule_state(self) -> dict:
        return self.schedule.state_dict() if self.schedule is not None else self._schedule_state

    @schedule_state.setter
    def schedule_state(self, value: dict) -> None:
        self._schedule_state = dict(value or {})
        if self.schedule is not None:
            self.schedule.load_state_dict(self._schedule_state)

    @property
    def noise_state(self) -> dict | None:
        return self.probe.estimator.state_dict() if self.probe is not None else self._noise_state

    @noise_state.setter
    def noise_state(self, value: dict | None) -> None:
        self._noise_state = value
        if self.probe is not None and value:
            self.probe.estimator.load_state_dict(value)

    @property
    def b_noise(self) -> float | None:
        """The smoothed gradient noise scale (samples), once measured."""
        return self.probe.estimator.b_noise if self.probe is not None else None

    # ---- the sample clock ----

    def _unit(self, args) -> int:
        return args.world_size * args.per_device_train_batch_size

    def position(self, step: float) -> float:
        """Optimizer steps at the first batch that cover the samples of ``step`` optimizer steps."""
        s0, n0, b = self.history[0]
        for s, n, batch in self.history:
            if step >= s:
                s0, n0, b = s, n, batch
        return (n0 + (step - s0) * b) / self.history[0][2]

    def _follow_samples(self, lr_scheduler) -> None:
        # The Trainer's schedules are functions of the optimizer step at the first batch: read them at the
        # samples seen instead, so warmup and decay stay where they were in samples.
        lambdas = getattr(lr_scheduler, "lr_lambdas", None)
        if lambdas is None:
            return

        def clocked(f):
            if getattr(f, "bigbatch_clock", False):
                return f

            def at_samples(step):
                return f(self.position(step))

            at_samples.bigbatch_clock = True  # a plain function: LambdaLR's state_dict keeps no trace of it
            return at_samples

        lr_scheduler.lr_lambdas = [clocked(f) for f in lambdas]

    def _set_max_steps(self, args, state) -> None:
        left = self.first_max_steps * self.history[0][2] - self.samples
        state.max_steps = state.global_step + max(0, math.ceil(left / self.global_batch))

    # ---- the Trainer's events ----

    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if args.deepspeed:
            raise BatchScheduleError("batch_schedule: DeepSpeed keeps its own gradient accumulation; train.py "
                                     "(batch.schedule) changes batches under DeepSpeed")
        unit = self._unit(args)
        now = unit * args.gradient_accumulation_steps
        if self.auto is not None and self.schedule is None:
            auto = {"start": now, "min_gap": self._warmup_samples(args, state, now), **self.auto}
            self.schedule = AutoBatchSchedule(**auto)
            self.schedule.load_state_dict(self._schedule_state)
        for i, batch in enumerate(self.schedule.batches()):
            if batch % unit:
                raise BatchScheduleError(
                    f"batch_schedule[{i}]: global batch {batch} must be a multiple of world size x "
                    f"per_device_train_batch_size = {unit}; nearest: {batch // unit * unit or unit}, "
                    f"{(batch // unit + 1) * unit}")
        if self.global_batch is None:
            self.global_batch = now
        if not self.history:
            if now != self.schedule.start:
                raise BatchScheduleError(
                    f"batch_schedule: the run starts at global batch {now} (gradient_accumulation_steps="
                    f"{args.gradient_accumulation_steps}) but the schedule at 0 samples says {self.schedule.start}; set "
                    f"gradient_accumulation_steps={self.schedule.start // unit}")
            self.history = [[0, 0, now]]
            self.first_max_steps = state.max_steps
        args.gradient_accumulation_steps = self.global_batch // unit  # a resume continues the saved batch
        self._set_max_steps(args, state)
        self._follow_samples(lr_scheduler)
        if self.auto is not None and self.probe is None and model is not None:
            self.probe = NoiseScaleProbe(model.parameters(), args.per_device_train_batch_size,
                                         micro_grad_scale=args.gradient_accumulation_steps,
                                         estimator=GradientNoiseScale(ema_decay=self.noise_ema))
            if self._noise_state:
                self.probe.estimator.load_state_dict(self._noise_state)

    @staticmethod
    def _warmup_samples(args, state, batch: int) -> int:
        steps = args.warmup_steps if args.warmup_steps >= 1 else args.warmup_steps * max(state.max_steps, 0)
        return int(steps * batch)

    def restore(self, saved: dict, args, state) -> tuple[int, int]:
        """Continue from a checkpoint's ``state()`` (the Trainer's ``stateful_callbacks`` entry): the batch,
        the schedule and the noise estimate; returns ``(epochs, micro batches)`` done in the Trainer's
        counting, which the Trainer itself derives from the first batch's accumulation."""
        for key, value in (saved.get("attributes") or {}).items():
            setattr(self, key, value)
        self.resuming = True
        if self.history:
            args.gradient_accumulation_steps = self.global_batch // self._unit(args)
            self._set_max_steps(args, state)
        return self.epochs_done, self.micro_in_epoch

    def on_epoch_begin(self, args, state, control, **kwargs):
        if not self.resuming:
            self.micro_in_epoch = 0
        self.resuming = False

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs_done += 1

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_in_step += 1
        if self.probe is not None:
            self.probe.micro_step_done()

    def observe_grad_norm(self, args, grad_norm) -> None:
        """The step's reduced gradient norm before clipping (after the last backward, every rank)."""
        if self.probe is None:
            return
        self.probe.micro_step_done()
        micro, self.micro_in_step = self.micro_in_step + 1, 0
        norm = float(grad_norm) if grad_norm is not None else math.nan
        # one micro batch on one rank gives one batch size only; a short last step of an epoch
        # scales its loss by its own count of micro batches
        if micro * args.world_size < 2 or micro != args.gradient_accumulation_steps or not math.isfinite(norm):
            self.probe.skip_step()
            self._measured = False
            return
        self.probe.step_done(global_sq_norm=norm * norm)
        self._measured = True

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.micro_in_epoch += args.gradient_accumulation_steps
        self.samples += self.global_batch
        measured, self._measured = self._measured, False
        if self.pending is not None:
            target = self.pending
        elif self.auto is not None:
            if not measured or state.global_step >= state.max_steps:
                return
            target = self.schedule.next_batch(self.samples, self.global_batch, self.b_noise)
            self._log_decision(args, state, target)
        else:
            target = self.schedule.batch_at(self.samples)
        new_accum = target // self._unit(args)
        if target == self.global_batch:
            return
        if self.micro_in_epoch % new_accum:
            self.pending = target
            return
        self._change(args, state, optimizer, lr_scheduler, target)

    def _change(self, args, state, optimizer, lr_scheduler, target: int) -> None:
        old, kappa = self.global_batch, target / self.global_batch
        family = self.optimizer or getattr(args, "bigbatch_optim", None) or type(optimizer)
        report = rescale_optimizer(optimizer, kappa, rule_for(family, **self.forms), scheduler=lr_scheduler,
                                   scheduler_in_samples=True)
        args.gradient_accumulation_steps = target // self._unit(args)
        self.global_batch, self.pending = target, None
        self.history.append([state.global_step, self.samples, target])
        self._set_max_steps(args, state)
        if self.probe is not None:
            self.probe.set_batch(args.per_device_train_batch_size, args.gradient_accumulation_steps)
        hp = report["groups"][0]
        change = {"step": state.global_step, "samples": self.samples, "old_global_batch": old, "global_batch": target,
                  "kappa": kappa, "hparams": hp, "max_steps": state.max_steps}
        self.changes.append(change)
        self._log("batch_change", {"old_global_batch": old, "global_batch": target, "kappa": kappa,
                                   "grad_accum": args.gradient_accumulation_steps, "samples": self.samples,
                                   "noise_scale": self.b_noise, "max_steps": state.max_steps,
                                   "lr": hp.get("lr"), **hparam_fields(hp)})
        if args.process_index == 0:
            logger.warning("bigbatch batch schedule: step %d, %d samples: global batch %d -> %d (accumulation %d; "
                           "B_noise %s); rescaled %s; max_steps %d", state.global_step, self.samples, old, target,
                           args.gradient_accumulation_steps, _fmt(self.b_noise), {"lr": hp.get("lr"), **hparam_fields(hp)},
                           state.max_steps)

    def _log_decision(self, args, state, target: int) -> None:
        # at each growth, and on logging steps when the reason for keeping the batch changed
        reason, grows = self.schedule.reason, target != self.global_batch
        if not grows and (reason == self._reason or state.global_step % max(1, int(args.logging_steps or 1))):
            return
        self._reason = reason
        self._log("batch_decision", {"global_batch": self.global_batch, "next_global_batch": target,
                                     "noise_scale": self.b_noise, "samples": self.samples})
        if args.process_index == 0:
            logger.warning("bigbatch batch schedule auto %s global batch %d%s at step %d: B_noise %s; %s",
                           "grows" if grows else "keeps", self.global_batch, f" -> {target}" if grows else "",
                           state.global_step, _fmt(self.b_noise), reason)

    def _log(self, kind: str, fields: dict) -> None:
        # numbers only: TensorBoard takes scalars; the keys group under the record's kind
        logs = {f"{kind}/{k}": float(v) for k, v in fields.items() if isinstance(v, (int, float)) and v is not None}
        if self.trainer is not None:
            control = self.trainer.control
            keep = control.should_log
            self.trainer.log(logs)  # on_log clears should_log: the step's own loss record must still come
            self.trainer.control.should_log = keep


def _fmt(b: float | None) -> str:
    return "not measured" if b is None else f"{b:.1f}"


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
from dataclasses import dataclass

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from bigbatch.hf.optim import format_optim_args, optimizer_cls_and_kwargs, parse_optim_args, short_name
from bigbatch.optim.registry import get_optimizer_class
from bigbatch.scaling.batch_schedule import FixedBatchSchedule
from bigbatch.scaling.planner import plan_batch
from bigbatch.scaling.rescale import rescale_optimizer
from bigbatch.scaling.rules import ScalingRule, rule_for, scale_steps

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
        self.forms = rule.forms() if rule is not None else forms
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
            the first at 0), as :class:`bigbatch.scaling.batch_schedule.FixedBatchSchedule`.
        optimizer: the scaling rule's optimizer (default: ``args.bigbatch_optim``, else the
            optimizer's class).
        forms: the scaling rule's choices by name (``beta_form`` and the others of
            :class:`~bigbatch.scaling.rules.ScalingRule`), for :func:`~bigbatch.scaling.rules.rule_for`.

    Every batch must be ``world size x per_device_train_batch_size x accumulation``; the run must
    start at the schedule's first batch (set ``gradient_accumulation_steps`` to match). At a change
    the callback sets ``args.gradient_accumulation_steps`` (the Trainer reads it for every optimizer
    step), rescales every parameter group (lr through the scheduler's base lrs, betas, eps,
    decoupled weight decay, AdaBound's final_lr and gamma), divides the optimizer's step counters by
    kappa and carries its second moments to the new batch. The Trainer counts micro batches per epoch
    and syncs gradients every ``gradient_accumulation_steps`` of them, so a change waits for the first
    step boundary at which the micro batches of the epoch so far are a multiple of the new
    accumulation (at most one step at the new batch's samples late). What the Trainer does not allow: its lr scheduler and
    ``max_steps`` stay in optimizer steps (after a growth the same steps cover more samples: bound
    the run by ``num_train_epochs``, or use a constant schedule after warmup); DeepSpeed engines keep
    their own accumulation (refused here; train.py changes batches under DeepSpeed); the data order
    is the Trainer's, so the batches after a change hold the next samples of the epoch but not a
    global order independent of the batch as in train.py. Its position is saved with Trainer
    checkpoints (``ExportableState``).
    """

    def __init__(self, schedule, optimizer=None, **forms):
        self.schedule = schedule if isinstance(schedule, FixedBatchSchedule) else FixedBatchSchedule(schedule, "samples")
        self.optimizer = optimizer
        self.forms = rule_for(optimizer or "adam", **forms).forms()  # checked now, applied to the run's optimizer
        self.samples = 0
        self.global_batch: int | None = None
        self.micro_in_epoch = 0
        self.changes: list[dict] = []

    def state(self) -> dict:
        return {"args": {"schedule": [list(e) for e in self.schedule.entries], "optimizer": self.optimizer,
                         **self.forms},
                "attributes": {"samples": self.samples, "global_batch": self.global_batch}}

    def _unit(self, args) -> int:
        return args.world_size * args.per_device_train_batch_size

    def on_train_begin(self, args, state, control, **kwargs):
        if args.deepspeed:
            raise ValueError("BatchScheduleCallback: DeepSpeed keeps its own gradient accumulation; train.py "
                             "(batch.schedule) changes batches under DeepSpeed")
        unit = self._unit(args)
        for i, (pos, batch) in enumerate(self.schedule.entries):
            if batch % unit:
                raise ValueError(f"schedule[{i}]: [{pos}, {batch}]: the global batch must be a multiple of world size "
                                 f"x per_device_train_batch_size = {unit}; nearest: {batch // unit * unit or unit}, "
                                 f"{(batch // unit + 1) * unit}")
        now = unit * args.gradient_accumulation_steps
        if self.global_batch is None:
            self.global_batch = now
        if now != self.global_batch and state.global_step == 0:
            raise ValueError(f"BatchScheduleCallback: the run starts at global batch {now} (gradient_accumulation_steps"
                             f"={args.gradient_accumulation_steps}) but the schedule at {self.samples} samples says "
                             f"{self.schedule.batch_at(self.samples)}; set gradient_accumulation_steps="
                             f"{self.schedule.batch_at(self.samples) // unit}")
        args.gradient_accumulation_steps = self.global_batch // unit  # a resume continues the saved batch

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.micro_in_epoch = 0

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):

        self.micro_in_epoch += args.gradient_accumulation_steps
        self.samples += self.global_batch
        target = self.schedule.batch_at(self.samples)
        new_accum = target // self._unit(args)
        if target == self.global_batch or self.micro_in_epoch % new_accum:
            return
        kappa = target / self.global_batch
        family = self.optimizer or getattr(args, "bigbatch_optim", None) or type(optimizer)
        report = rescale_optimizer(optimizer, kappa, rule_for(family, **self.forms), scheduler=lr_scheduler,
                                   scheduler_in_samples=True)
        self.changes.append({"step": state.global_step, "samples": self.samples, "old_global_batch": self.global_batch,
                             "global_batch": target, "kappa": kappa, "hparams": report["groups"][0]})
        args.gradient_accumulation_steps = new_accum
        self.global_batch = target
        if args.process_index == 0:
            logger.warning("bigbatch batch schedule: step %d, %d samples: global batch %d -> %d (accumulation %d); "
                           "rescaled %s", state.global_step, self.samples, self.changes[-1]["old_global_batch"],
                           target, new_accum, report["groups"][0])

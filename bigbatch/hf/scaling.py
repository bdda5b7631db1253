"""A ``TrainerCallback`` that applies bigbatch's batch-size scaling rules before the optimizer is built.

The user gives the hyperparameters tuned at ``reference_batch_size`` (global samples per optimizer
step) in the usual training arguments. At the end of ``Trainer.__init__`` (``on_init_end``; the
optimizer is built later, in ``train``) the callback reads the run's global batch = world size x
``per_device_train_batch_size`` x ``gradient_accumulation_steps``, plans it with
:func:`bigbatch.optim.plan_batch` (policy ``"scale"``), and writes the scaled values back into the
arguments: ``learning_rate``, ``adam_beta1``/``adam_beta2``, ``adam_epsilon``, ``weight_decay``
(decoupled decay only), ``optim_args`` (``final_lr``, ``gamma``), and the step counts ``max_steps`` and
integer ``warmup_steps`` (divided by kappa: same samples). It logs them and keeps them in
:attr:`ScalingRulesCallback.applied`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from transformers import TrainerCallback

from bigbatch.hf.optim import format_optim_args, optimizer_cls_and_kwargs, parse_optim_args, short_name
from bigbatch.scaling.planner import plan_batch
from bigbatch.optim.registry import get_optimizer_class
from bigbatch.scaling.rules import scale_steps

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
        beta_form, overrides: as for :func:`bigbatch.optim.scale_hparams`.
    """

    def __init__(self, optimizer=None, reference_batch_size: int | None = None, *, beta_form: str = "paper",
                 overrides: dict | None = None):
        self.optimizer = optimizer
        self.reference_batch_size = reference_batch_size
        self.beta_form = beta_form
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
                          beta_form=self.beta_form, overrides=self.overrides)
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

"""``BigBatchTrainingArguments`` and ``BigBatchTrainer``: the HF Trainer with our optimizers by name.

    args = BigBatchTrainingArguments(output_dir, optim="adabound", optim_args="final_lr=10",
                                     learning_rate=3e-3, reference_batch_size=256,
                                     deepspeed="configs/deepspeed/zero2.json")
    trainer = BigBatchTrainer(model=model, args=args, train_dataset=ds)

``optim`` accepts ``adabound``, ``amsbound`` and ``radam`` (ours shadow the Trainer's names) besides the
Trainer's own; ``--optim adabound --optim_args final_lr=10`` works from ``HfArgumentParser`` (without
``final_lr`` AdaBound/AMSBound take :data:`TRANSFORMER_FINAL_LR`, tuned for Transformers). A
DeepSpeed config whose ``"optimizer"`` block names one of ours is taken apart by
:func:`bigbatch.hf.deepspeed.split_optimizer_block`. With ``reference_batch_size`` the trainer adds a
:class:`~bigbatch.hf.scaling.ScalingRulesCallback`, with ``batch_schedule`` a
:class:`~bigbatch.hf.scaling.BatchScheduleCallback` (fixed or ``auto``). The printed arguments and ``to_dict``
name bigbatch's optimizer, not the Trainer's placeholder. Under a launcher on a host without an accelerator
the accelerate state is built with gloo (:mod:`bigbatch.hf.accelerate`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.training_args import OptimizerNames

from bigbatch.hf.deepspeed import split_optimizer_block
from bigbatch.distributed import deepspeed_without_shm
from bigbatch.hf.accelerate import init_distributed_state, needs_backend_fix
from bigbatch.hf.optim import format_optim_args, optimizer_cls_and_kwargs, parse_optim_args
from bigbatch.hf.scaling import BatchScheduleCallback, ScalingRulesCallback
from bigbatch.scaling.batch_schedule import AutoBatchSchedule, BatchScheduleError, FixedBatchSchedule
from bigbatch.optim.registry import BIGBATCH_OPTIMIZERS, get_optimizer_class, is_bigbatch_optimizer
from bigbatch.scaling.rules import BETA_FORMS, check_form

logger = logging.getLogger(__name__)

#: AdaBound/AMSBound's bounds when ``optim_args`` names no ``final_lr``: the value tuned for Transformers
#: (docs/science.md, section 2: the tiny Llama with lr 3e-3 and gamma 1e-3; the paper's 0.1, an SGD lr for
#: image models, clipped nearly every step to SGD's and ended 0.78 nats behind)
TRANSFORMER_FINAL_LR = 10.0
_said_default = False


class BigBatchArgumentError(ValueError):
    """A training argument bigbatch reads is wrong; the message names it, its value and what is allowed."""

    bigbatch_argument = True


def is_argument_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bigbatch's check of a training argument (every such error has one line)."""
    return isinstance(exc, ValueError) and getattr(exc, "bigbatch_argument", False)


def _main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) in ("0", "")


def transformer_defaults(name: str, extra: dict) -> dict:
    """``extra`` with AdaBound's ``final_lr`` for Transformers when it names none (said once per process)."""
    global _said_default
    if name not in ("adabound", "amsbound") or "final_lr" in extra:
        return extra
    if not _said_default and _main_process():
        logger.warning("bigbatch: %s without final_lr in --optim_args: final_lr=%g, the value tuned for Transformers "
                       "(docs/science.md section 2, with lr 3e-3: the paper's 0.1 is an SGD lr for image models and "
                       "turns AdaBound into SGD within the first steps); give --optim_args final_lr=... to choose",
                       name, TRANSFORMER_FINAL_LR)
        _said_default = True
    return {**extra, "final_lr": TRANSFORMER_FINAL_LR}


@dataclass
class BigBatchTrainingArguments(TrainingArguments):
    """``TrainingArguments`` whose ``optim`` also takes ``adabound``, ``amsbound``, ``radam`` and any other
    name of bigbatch's registry or a class path (``torch.optim.NAdam``).

    After construction ``bigbatch_optim`` holds that optimizer's name (or ``None``), ``optim``
    the Trainer's placeholder, ``optim_args`` the merged, typed-checked extra kwargs, and
    ``deepspeed`` the config dict without our optimizer block.
    """

    # Re-declared as a plain str so that HfArgumentParser offers no closed list of choices for --optim.
    optim: str = field(default="adamw_torch", metadata={
        "help": "Optimizer: bigbatch's adabound, amsbound, radam (or a torch optimizer class path), or any of the "
                "Trainer's names (adamw_torch, ...)."})
    reference_batch_size: int | None = field(default=None, metadata={
        "help": "Global batch (samples per optimizer step) at which the optimizer arguments were tuned; when "
                "given, bigbatch's scaling rules carry them to this run's global batch."})
    scaling_beta_form: str = field(default="paper", metadata={
        "help": "Beta scaling: 'paper' (1 - kappa (1 - beta)) or 'power' (beta ** kappa)."})
    batch_schedule: str | None = field(default=None, metadata={
        "help": "Global batch during training: '[[samples, global_batch], ...]' (JSON, the first at 0 samples) or "
                "'auto' (grow by growth_factor while the measured gradient noise scale allows, up to "
                "max_global_batch). Changes go through gradient accumulation; the scaling rules move the "
                "optimizer, the lr schedule and max_steps follow samples."})
    max_global_batch: int | None = field(default=None, metadata={"help": "batch_schedule auto: the largest batch."})
    growth_factor: int = field(default=2, metadata={"help": "batch_schedule auto: factor of each growth."})
    growth_margin: float = field(default=0.75, metadata={
        "help": "batch_schedule auto: grow when B_noise >= margin x the next batch."})
    growth_patience: int = field(default=10, metadata={
        "help": "batch_schedule auto: consecutive measurements that must agree before a growth."})
    growth_min_samples: int | None = field(default=None, metadata={
        "help": "batch_schedule auto: samples before the first growth and between two (default: the lr warmup)."})

    def __post_init__(self):
        try:
            self._bigbatch_post_init()
        except BatchScheduleError as exc:
            raise BigBatchArgumentError(str(exc)) from None
        except ValueError as exc:  # the optimizer's, DeepSpeed config's and scaling checks name the value
            exc.bigbatch_argument = True  # the runner says it in one line
            raise
        super().__post_init__()

    def _bigbatch_post_init(self):
        self.bigbatch_optim = None
        trainer_names = {o.value for o in OptimizerNames}
        if isinstance(self.optim, str) and (is_bigbatch_optimizer(self.optim) or self.optim not in trainer_names):
            # ours shadow the Trainer's names; any other registry name or class path is built by bigbatch too
            try:
                get_optimizer_class(self.optim)
            except (ValueError, TypeError):
                raise ValueError(f"optim={self.optim!r}: unknown; bigbatch's are {list(BIGBATCH_OPTIMIZERS)} (or any "
                                 f"torch optimizer class path), the Trainer's {sorted(trainer_names)}") from None
            self.bigbatch_optim = self.optim.lower() if self.optim.lower() in BIGBATCH_OPTIMIZERS else self.optim
            self.optim = "adamw_torch"  # placeholder for the Trainer's enum; BigBatchTrainer builds the optimizer
        block = None
        if self.deepspeed:
            deepspeed_without_shm()
            if self.use_cpu:
                raise ValueError("use_cpu=True with deepspeed: accelerate then turns DeepSpeed off silently; leave "
                                 "use_cpu False (bigbatch sets up gloo on CPU hosts itself)")
            cfg, block = split_optimizer_block(self.deepspeed, self.bigbatch_optim)
            if block is not None:
                if self.bigbatch_optim not in (None, block.name):
                    raise ValueError(f"optim={self.bigbatch_optim!r} but the DeepSpeed config's optimizer.type names "
                                     f"{block.name!r}; give one")
                self.bigbatch_optim = block.name
                self.deepspeed = cfg
        elif needs_backend_fix() and not self.use_cpu:
            # Without it accelerate sees no backend on a CPU host: each process would train alone.
            logger.info("bigbatch: launched on a host without an accelerator: use_cpu=True (gloo DDP)")
            self.use_cpu = True
        if self.bigbatch_optim is not None:
            extra = parse_optim_args(self.optim_args, self.bigbatch_optim)
            if block is not None:
                extra = block.fill(self, extra)
            extra = transformer_defaults(self.bigbatch_optim, extra)
            self.optim_args = format_optim_args(extra) or None
            optimizer_cls_and_kwargs(self.bigbatch_optim, self)  # bad values fail here, naming them
        if self.reference_batch_size is not None and (
                isinstance(self.reference_batch_size, bool) or not isinstance(self.reference_batch_size, int)
                or self.reference_batch_size < 1):
            raise ValueError(f"reference_batch_size: expected an int >= 1, got {self.reference_batch_size!r}")
        check_form("scaling_beta_form", self.scaling_beta_form, BETA_FORMS)
        self._check_batch_schedule()

    def _check_batch_schedule(self) -> None:
        sched = self.batch_schedule
        if sched is not None and self.deepspeed:
            raise BatchScheduleError(f"batch_schedule={sched!r} with deepspeed: DeepSpeed keeps its own gradient "
                                     "accumulation; drop one (train.py changes batches under DeepSpeed)")
        if sched is None or sched == "auto":
            if sched == "auto" and self.max_global_batch is None:
                raise BatchScheduleError("batch_schedule=auto: give --max_global_batch (the largest global batch)")
            if sched == "auto":
                self.schedule_callback()  # checks max_global_batch, growth_* now
            return
        if isinstance(sched, str):
            try:
                sched = json.loads(sched)
            except json.JSONDecodeError:
                raise BatchScheduleError(f"batch_schedule={self.batch_schedule!r}: expected 'auto' or a JSON list "
                                         "[[samples, global_batch], ...]") from None
        FixedBatchSchedule(sched, "samples")
        self.batch_schedule = json.dumps(sched)

    def schedule_callback(self) -> BatchScheduleCallback | None:
        """The :class:`BatchScheduleCallback` of ``batch_schedule`` (None without one)."""
        if self.batch_schedule is None:
            return None
        kw = dict(beta_form=self.scaling_beta_form)
        if self.batch_schedule == "auto":
            auto = {"maximum": self.max_global_batch, "factor": self.growth_factor, "margin": self.growth_margin,
                    "patience": self.growth_patience, "gap_name": "growth_min_samples"}
            if self.growth_min_samples is not None:
                auto["min_gap"] = self.growth_min_samples
            AutoBatchSchedule(start=1, **auto)  # the settings' own checks, before any work
            return BatchScheduleCallback("auto", auto=auto, **kw)
        return BatchScheduleCallback(json.loads(self.batch_schedule), **kw)

    def _bigbatch_repr(self, text: str) -> str:
        if self.bigbatch_optim is None:
            return text
        return text.replace(f"optim={self.optim},\n", f"optim={self.bigbatch_optim},\n", 1)

    def __str__(self):
        # the Trainer's placeholder is not what runs: name bigbatch's optimizer
        return self._bigbatch_repr(super().__str__())

    __repr__ = __str__

    def to_dict(self):
        d = super().to_dict()
        if getattr(self, "bigbatch_optim", None) is not None:
            d["optim"] = self.bigbatch_optim
        return d

    @cached_property
    def _setup_devices(self):
        if self.deepspeed and needs_backend_fix():
            init_distributed_state(use_deepspeed=True)
            # Tell the Trainer to keep that state instead of rebuilding one without a backend.
            if isinstance(self.accelerator_config, dict):
                self.accelerator_config["use_configured_state"] = True
            elif self.accelerator_config is None:
                self.accelerator_config = {"use_configured_state": True}
            else:
                self.accelerator_config.use_configured_state = True
        return TrainingArguments._setup_devices.func(self)


class BigBatchTrainer(Trainer):
    """``Trainer`` that builds ``args.bigbatch_optim`` (with the usual decay / no-decay groups).

    Adds a :class:`ScalingRulesCallback` when ``args.reference_batch_size`` is set and a
    :class:`BatchScheduleCallback` for ``args.batch_schedule``, unless one is given. At the start of
    training it names the optimizer it built and its (scaled) hyperparameters in one line.
    """

    def __init__(self, model=None, args=None, *pos, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if getattr(args, "reference_batch_size", None) and not any(isinstance(c, ScalingRulesCallback) for c in callbacks):
            callbacks.append(ScalingRulesCallback(beta_form=args.scaling_beta_form))
        if getattr(args, "batch_schedule", None) and not any(isinstance(c, BatchScheduleCallback) for c in callbacks):
            start = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
            if args.batch_schedule == "auto" and args.max_global_batch < start:
                raise BigBatchArgumentError(f"max_global_batch={args.max_global_batch}: below the run's first global "
                                            f"batch {start} = {args.world_size} proc x "
                                            f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps} "
                                            "accum")
            callbacks.append(args.schedule_callback())
        if getattr(args, "bigbatch_optim", None) and kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"optim={args.bigbatch_optim!r} and optimizer_cls_and_kwargs both given; give one")
        super().__init__(model, args, *pos, callbacks=callbacks, **kwargs)

    def _schedules(self) -> list[BatchScheduleCallback]:
        return [c for c in self.callback_handler.callbacks if isinstance(c, BatchScheduleCallback)]

    def create_optimizer(self, model=None):
        name = getattr(self.args, "bigbatch_optim", None)
        if self.optimizer is None and name is not None:
            # Read now, not in __init__: the scaling callback has changed the arguments by then.
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(name, self.args)
        return super().create_optimizer(model)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        epochs, micro = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                                     resume_from_checkpoint, trial)
        saved = self.state.stateful_callbacks.get(BatchScheduleCallback.__name__) if resume_from_checkpoint else None
        for cb, data in zip(self._schedules(), saved if isinstance(saved, list) else [saved]):
            cb.trainer = self
            if data:  # restored here whether or not restore_callback_states_from_checkpoint is on
                done, micro_done = cb.restore(data, self.args, self.state)
                if cb.history and not self.args.ignore_data_skip:
                    epochs, micro = done, micro_done
        for cb in self._schedules():
            cb.trainer = self
        return epochs, micro

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        for cb in self._schedules():  # the pre-clip norm of the reduced gradient: the noise scale's big batch
            cb.observe_grad_norm(self.args, grad_norm)
        return grad_norm

    def _inner_training_loop(self, *a, **kw):
        self.add_callback(_StartLine(self))
        try:
            return super()._inner_training_loop(*a, **kw)
        finally:
            self.callback_handler.remove_callback(_StartLine)


def built_optimizer(trainer):
    """The torch optimizer inside whatever wrappers accelerate / DeepSpeed put around it."""
    opt = trainer.optimizer
    while getattr(opt, "optimizer", None) is not None and type(opt).__module__.split(".")[0] in ("accelerate",
                                                                                                "deepspeed"):
        opt = opt.optimizer
    return opt


class _StartLine(TrainerCallback):
    """One line at the start of training: the optimizer built, its hyperparameters, the batch."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.trainer.is_world_process_zero():
            return
        opt = built_optimizer(self.trainer)
        group = {k: v for k, v in opt.param_groups[0].items() if k != "params" and not isinstance(v, (list, dict))
                 and k not in ("foreach", "fused", "maximize", "capturable", "differentiable", "initial_lr")}
        decays = sorted({g.get("weight_decay") for g in opt.param_groups if "weight_decay" in g})
        group["weight_decay"] = decays if len(decays) > 1 else group.get("weight_decay")
        batch = args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
        scaled = next((c.applied for c in self.trainer.callback_handler.callbacks
                       if isinstance(c, ScalingRulesCallback) and c.applied is not None), None)
        rule = (f"; scaled from reference batch {scaled.reference_global_batch} (kappa {scaled.kappa:g})"
                if scaled else "")
        text = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in group.items())
        engine = self.trainer.model_wrapped
        where = (f" under DeepSpeed ZeRO-{engine.zero_optimization_stage()}" if self.trainer.is_deepspeed_enabled
                 and hasattr(engine, "zero_optimization_stage") else "")
        logger.warning("bigbatch: optimizer %s(%s)%s at global batch %d = %d proc x %d x %d accum%s%s",
                       type(opt).__name__, text, where, batch, args.world_size, args.per_device_train_batch_size,
                       args.gradient_accumulation_steps, rule,
                       f"; batch_schedule {args.batch_schedule}" if getattr(args, "batch_schedule", None) else "")

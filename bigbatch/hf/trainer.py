"""``BigBatchTrainingArguments`` and ``BigBatchTrainer``: the HF Trainer with our optimizers by name.

    args = BigBatchTrainingArguments(output_dir, optim="adabound", optim_args="final_lr=0.1",
                                     learning_rate=1e-3, reference_batch_size=256,
                                     deepspeed="configs/deepspeed/zero2.json")
    trainer = BigBatchTrainer(model=model, args=args, train_dataset=ds)

``optim`` accepts ``adabound``, ``amsbound`` and ``radam`` (ours shadow the Trainer's names) besides the
Trainer's own; ``--optim adabound --optim_args final_lr=0.1`` works from ``HfArgumentParser``. A
DeepSpeed config whose ``"optimizer"`` block names one of ours is taken apart by
:func:`bigbatch.hf.deepspeed.split_optimizer_block`. With ``reference_batch_size`` the trainer adds a
:class:`~bigbatch.hf.scaling.ScalingRulesCallback`. Under a launcher on a host without an accelerator
the accelerate state is built with gloo (:mod:`bigbatch.hf.accelerate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from bigbatch.hf.deepspeed import split_optimizer_block
from bigbatch.distributed import deepspeed_without_shm
from bigbatch.hf.accelerate import init_distributed_state, needs_backend_fix
from bigbatch.hf.optim import format_optim_args, optimizer_cls_and_kwargs, parse_optim_args
from bigbatch.hf.scaling import ScalingRulesCallback
from bigbatch.optim.registry import BIGBATCH_OPTIMIZERS, get_optimizer_class, is_bigbatch_optimizer
from bigbatch.scaling.rules import BETA_FORMS, check_form

logger = logging.getLogger(__name__)


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

    def __post_init__(self):
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
            self.optim_args = format_optim_args(extra) or None
            optimizer_cls_and_kwargs(self.bigbatch_optim, self)  # bad values fail here, naming them
        if self.reference_batch_size is not None and (
                isinstance(self.reference_batch_size, bool) or not isinstance(self.reference_batch_size, int)
                or self.reference_batch_size < 1):
            raise ValueError(f"reference_batch_size: expected an int >= 1, got {self.reference_batch_size!r}")
        check_form("scaling_beta_form", self.scaling_beta_form, BETA_FORMS)
        super().__post_init__()

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

    Adds a :class:`ScalingRulesCallback` when ``args.reference_batch_size`` is set and none is given.
    """

    def __init__(self, model=None, args=None, *pos, callbacks=None, **kwargs):
        callbacks = list(callbacks or [])
        if getattr(args, "reference_batch_size", None) and not any(isinstance(c, ScalingRulesCallback) for c in callbacks):
            callbacks.append(ScalingRulesCallback(beta_form=args.scaling_beta_form))
        if getattr(args, "bigbatch_optim", None) and kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(f"optim={args.bigbatch_optim!r} and optimizer_cls_and_kwargs both given; give one")
        super().__init__(model, args, *pos, callbacks=callbacks, **kwargs)

    def create_optimizer(self, model=None):
        name = getattr(self.args, "bigbatch_optim", None)
        if self.optimizer is None and name is not None:
            # Read now, not in __init__: the scaling callback has changed the arguments by then.
            self.optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(name, self.args)
        return super().create_optimizer(model)

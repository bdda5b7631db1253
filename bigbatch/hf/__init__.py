"""Hugging Face Trainer and Accelerate integration: our optimizers by name, DeepSpeed configs, scaling rules.

* :func:`optimizer_cls_and_kwargs` -- ``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.
* :class:`BigBatchTrainingArguments` / :class:`BigBatchTrainer` -- ``--optim adabound --optim_args
  "final_lr=0.1"``, DeepSpeed configs whose optimizer block names AdaBound/AMSBound/RAdam, and the
  CPU DeepSpeed world-size fix.
* :class:`ScalingRulesCallback` -- carries hyperparameters tuned at a reference global batch to the
  run's global batch (world size x per-device batch x accumulation) before the optimizer is built.
* :class:`BatchScheduleCallback` -- follows a global-batch schedule through gradient accumulation, rescaling
  the live optimizer at every change.
* :func:`install` -- every ``TrainingArguments`` / ``Trainer`` a script makes afterwards is bigbatch's
  (``python -m bigbatch.hf.run SCRIPT.py ...`` does it for an unmodified script).
* :func:`init_distributed_state` -- the accelerate state with the right backend (Accelerate scripts).
"""

from bigbatch.hf.accelerate import decay_groups, init_distributed_state, take_optimizer_block
from bigbatch.hf.deepspeed import OptimizerBlock, split_optimizer_block
from bigbatch.hf.patch import TESTED as TESTED_TRANSFORMERS, install
from bigbatch.hf.optim import format_optim_args, optimizer_cls_and_kwargs, parse_optim_args
from bigbatch.hf.scaling import AppliedScaling, BatchScheduleCallback, ScalingRulesCallback
from bigbatch.hf.trainer import BigBatchTrainer, BigBatchTrainingArguments

__all__ = ["decay_groups", "take_optimizer_block", "OptimizerBlock", "split_optimizer_block", "init_distributed_state", "format_optim_args",
           "optimizer_cls_and_kwargs", "parse_optim_args", "AppliedScaling", "BatchScheduleCallback", "ScalingRulesCallback",
           "BigBatchTrainer", "BigBatchTrainingArguments", "install", "TESTED_TRANSFORMERS"]

"""Optimizers and batch-size scaling for large-batch training.

``AdaBound``, ``AMSBound`` and ``RAdam`` are torch optimizers exact to their papers' official
code, with a fused (compiled) single-pass update; ``get_optimizer_class`` resolves a name or a
class path.
"""

from bigbatch.optim.adabound import AdaBound, AMSBound
from bigbatch.optim.radam import RAdam
from bigbatch.optim.registry import OPTIMIZERS, canonical_name, get_optimizer_class

__all__ = ["AdaBound", "AMSBound", "RAdam", "OPTIMIZERS", "canonical_name", "get_optimizer_class"]

# --- scaling (issue 3) ---
from bigbatch.optim.batch_planner import BatchPlan, plan_batch
from bigbatch.optim.noise_scale import GradientNoiseScale, GradSqNormHook, NoiseScaleProbe, grad_sq_norm
from bigbatch.optim.scaling import ScalingRuleWarning, scale_hparams, scale_steps
from bigbatch.optim.schedules import SampleSchedule

__all__ += [
    "BatchPlan", "plan_batch", "GradientNoiseScale", "GradSqNormHook", "NoiseScaleProbe", "grad_sq_norm",
    "ScalingRuleWarning", "scale_hparams", "scale_steps", "SampleSchedule",
]
# --- end scaling ---

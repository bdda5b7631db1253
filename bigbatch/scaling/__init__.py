"""Batch-size scaling: the rules that carry hyperparameters across global batch sizes (Malladi et
al. 2022, and a derived one for AdaBound), the batch planner for a world size, learning-rate
schedules in samples or tokens, and the gradient noise scale that says where the rules hold.
"""

from bigbatch.scaling.noise_scale import GradientNoiseScale, GradSqNormHook, NoiseScaleProbe, grad_sq_norm
from bigbatch.scaling.planner import BatchPlan, plan_batch
from bigbatch.scaling.rules import ScalingRuleWarning, scale_hparams, scale_steps
from bigbatch.scaling.schedules import SampleSchedule

__all__ = [
    "BatchPlan", "plan_batch", "GradientNoiseScale", "GradSqNormHook", "NoiseScaleProbe", "grad_sq_norm",
    "ScalingRuleWarning", "scale_hparams", "scale_steps", "SampleSchedule",
]

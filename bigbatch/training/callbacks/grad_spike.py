"""An alarm for gradient-norm spikes, the usual first sign of a diverging large-batch run."""

from __future__ import annotations

import math

from bigbatch.training.callbacks.base import Callback, StepResult


class GradNormSpike(Callback):
    """A ``grad_spike`` record and a warning when a step's gradient norm exceeds ``factor`` x its
    exponential moving average (decay ``ema``) after ``warmup`` steps; the spike itself does not enter
    the average. Not saved: a resumed run warms up again."""

    def __init__(self, factor: float, ema: float = 0.98, warmup: int = 20):
        self.factor, self.ema, self.warmup = factor, ema, warmup
        self.mean, self.seen = 0.0, 0

    def post_step(self, trainer, result: StepResult) -> None:
        g = result.grad_norm
        if not math.isfinite(g):
            return
        mean = self.mean / (1 - self.ema**self.seen) if self.seen else 0.0  # bias-corrected
        if self.seen >= self.warmup and g > self.factor * mean:
            msg = (f"warning: step {trainer.step}: gradient norm {g:.4g} is {g / mean:.1f} x its moving average "
                   f"{mean:.4g} (train.grad_spike_factor={self.factor:g})")
            trainer.logger.log({"kind": "grad_spike", "step": trainer.step, "tokens": trainer.tokens,
                                "grad_norm": g, "grad_norm_ema": mean, "message": msg})
            trainer.progress.write(msg)
            return
        self.mean = self.ema * self.mean + (1 - self.ema) * g
        self.seen += 1

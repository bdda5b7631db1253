"""An alarm for gradient-norm spikes, the usual first sign of a diverging large-batch run."""

from __future__ import annotations

import math

from bigbatch.training.callbacks.base import Callback, StepResult


class GradNormSpike(Callback):
    """A ``grad_spike`` record and a warning when a step's gradient norm exceeds ``factor`` x its
    exponential moving average (decay ``ema``) after ``warmup`` steps; the spike itself does not enter
    the average. Each step's norm stays on the device until the next sync point, where the steps are
    judged in order. Not saved: a resumed run warms up again."""

    priority = 40

    def __init__(self, factor: float, ema: float = 0.98, warmup: int = 20):
        self.factor, self.ema, self.warmup = factor, ema, warmup
        self.mean, self.seen = 0.0, 0
        self.steps: list[tuple[int, int]] = []  # (step, tokens) since the last sync point

    def post_step(self, trainer, result: StepResult) -> None:
        self.steps.append((trainer.step, trainer.tokens))
        trainer.agree("grad_spike/grad_norm", result.metrics["grad_norm"], "each_same")

    def on_sync(self, trainer, values: dict) -> None:
        steps, self.steps = self.steps, []
        for (step, tokens), g in zip(steps, values["grad_spike/grad_norm"]):
            self.judge(trainer, step, tokens, g)

    def judge(self, trainer, step: int, tokens: int, g: float) -> None:
        if not math.isfinite(g):
            return
        mean = self.mean / (1 - self.ema**self.seen) if self.seen else 0.0  # bias-corrected
        if self.seen >= self.warmup and g > self.factor * mean:
            msg = (f"warning: step {step}: gradient norm {g:.4g} is {g / mean:.1f} x its moving average "
                   f"{mean:.4g} (train.grad_spike_factor={self.factor:g})")
            trainer.log({"kind": "grad_spike", "step": step, "tokens": tokens, "grad_norm": g,
                         "grad_norm_ema": mean, "message": msg})
            trainer.say(msg)
            return
        self.mean = self.ema * self.mean + (1 - self.ema) * g
        self.seen += 1

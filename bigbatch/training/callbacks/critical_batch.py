"""A warning when the global batch passes the critical batch (the measured gradient noise scale)."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback


class CriticalBatchWarning(Callback):
    """Once per crossing, when the global batch exceeds ``factor`` x B_noise: past the critical batch
    the scaling rules no longer hold."""

    priority = 30

    def __init__(self, factor: float):
        self.factor = factor
        self.past = False

    def on_measure(self, trainer, step: int, tokens: int, b_noise: float | None) -> None:
        batch = trainer.plan.global_batch
        past = b_noise is not None and batch > self.factor * b_noise
        if past and not self.past:
            msg = (f"warning: global batch {batch} exceeds {self.factor:g} x the measured gradient noise scale "
                   f"B_noise={b_noise:.1f}: past the critical batch the scaling rules do not hold and a larger batch "
                   "will not train proportionally faster")
            trainer.log({"kind": "warning", "step": step, "tokens": tokens, "global_batch": batch,
                         "noise_scale": b_noise, "message": msg})
            trainer.say(msg)
        self.past = past

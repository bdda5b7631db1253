"""Steps whose gradient was not finite: recorded, and too many in a row stop the run."""

from __future__ import annotations

import torch

from bigbatch import exit_codes
from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.run_state import RunStopped


class SkippedSteps(Callback):
    """The engine skipped a step whose gradient was NaN or inf (no state changed): a ``skipped_step``
    record and a warning for each, and after ``limit`` in a row a stop (exit 3). Where the engine decided
    on the device, which steps were skipped is read at the next sync point. fp16 is left to DeepSpeed's
    loss scaler, which skips while it searches its scale and stops the run itself at the smallest one."""

    priority = 10

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.steps: list[tuple[int, int]] = []  # (step, tokens) of the steps since the last sync point
        self.host: list[bool] = []  # their skips where the engine said on the host

    def post_step(self, trainer, result: StepResult) -> None:
        self.steps.append((trainer.step, trainer.tokens))
        trainer.agree("skipped/grad_norm", result.metrics["grad_norm"], "each_same")
        applied = result.applied
        if isinstance(applied, torch.Tensor):
            trainer.agree("skipped", (~applied).to(torch.float32), "each_same")
        else:
            self.host.append(not applied)

    def on_sync(self, trainer, values: dict) -> None:
        skipped = [bool(x) for x in values.get("skipped", [])] + self.host
        steps, self.steps, self.host = self.steps, [], []
        for (step, tokens), skip, norm in zip(steps, skipped, values["skipped/grad_norm"]):
            if not skip:
                self.in_a_row = 0
                continue
            self.in_a_row += 1
            total = trainer.count_skipped()
            msg = (f"step {step}: gradient norm {norm} is not finite; the optimizer step was skipped "
                   f"({self.in_a_row} in a row, {total} in all)")
            trainer.log({"kind": "skipped_step", "step": step, "tokens": tokens, "grad_norm": norm,
                         "skipped_steps": total, "in_a_row": self.in_a_row})
            trainer.say(f"warning: {msg}")
            if self.in_a_row >= self.limit and trainer.engine.precision != "fp16":
                raise RunStopped(exit_codes.NOT_FINITE,
                                 f"error: {self.limit} optimizer steps in a row had non-finite gradients "
                                 f"(train.max_skipped_steps={self.limit}); stopping at step {step}. The weights "
                                 f"are those of step {step - self.limit}; resume from the last checkpoint with "
                                 "a lower lr or inspect the data")

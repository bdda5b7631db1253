"""Steps whose gradient was not finite: recorded, and too many in a row stop the run."""

from __future__ import annotations

from bigbatch import exit_codes
from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.run_state import RunStopped


class SkippedSteps(Callback):
    """The engine skipped a step whose gradient was NaN or inf (no state changed): a ``skipped_step``
    record, a warning, and after ``limit`` in a row a stop (exit 3). fp16 is left to DeepSpeed's loss
    scaler, which skips while it searches its scale and stops the run itself at the smallest one."""

    def __init__(self, limit: int):
        self.limit = limit

    def post_step(self, trainer, result: StepResult) -> None:
        if trainer.skipped_in_a_row == 0:
            return
        msg = (f"step {trainer.step}: gradient norm {result.grad_norm} is not finite; the optimizer step was skipped "
               f"({trainer.skipped_in_a_row} in a row, {trainer.skipped} in all)")
        trainer.logger.log({"kind": "skipped_step", "step": trainer.step, "tokens": trainer.tokens,
                            "grad_norm": result.grad_norm, "skipped_steps": trainer.skipped,
                            "in_a_row": trainer.skipped_in_a_row})
        trainer.progress.write(f"warning: {msg}")
        if trainer.skipped_in_a_row >= self.limit and trainer.engine.precision != "fp16":
            raise RunStopped(exit_codes.NOT_FINITE,
                             f"error: {self.limit} optimizer steps in a row had non-finite gradients "
                             f"(train.max_skipped_steps={self.limit}); stopping at step {trainer.step}. The weights "
                             f"are those of step {trainer.step - self.limit}; resume from the last checkpoint with "
                             "a lower lr or inspect the data")

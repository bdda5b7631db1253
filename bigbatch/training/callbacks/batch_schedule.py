"""A batch-size schedule (fixed entries or automatic) put in force between two steps."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult


class BatchSchedule(Callback):
    """Between two steps, the schedule's batch (:mod:`bigbatch.scaling.batch_schedule`) through
    :meth:`Trainer.change_batch <bigbatch.training.loop.Trainer.change_batch>`. ``auto`` decides on
    each noise-scale measurement and keeps its state across a resume."""

    state_key = "batch_schedule"

    def __init__(self, schedule, auto: bool):
        self.schedule, self.auto = schedule, auto

    def resume_batch(self, trainer, saved: int, planned: int) -> int:
        """An automatic schedule continues with the saved batch, a fixed one with its batch at the
        tokens seen."""
        return saved if self.auto else self.schedule.batch_at(trainer.tokens)

    def post_step(self, trainer, result: StepResult) -> None:
        if result.last:
            return
        if self.auto:
            if not result.measured:
                return
            new = self.schedule.next_batch(trainer.tokens, trainer.plan.global_batch, trainer.noise.b_noise)
        else:
            new = self.schedule.batch_at(trainer.tokens)
        if trainer.batch_limit is not None:  # the nodes in hand take no more (scale_out after a lost node)
            new = min(new, trainer.batch_limit)
        if new != trainer.plan.global_batch:
            trainer.change_batch(new)

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

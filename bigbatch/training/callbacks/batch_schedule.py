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
        self.reason = None  # an automatic schedule's last decision, logged when it changes

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
            self.log_decision(trainer, new)
        else:
            new = self.schedule.batch_at(trainer.tokens)
        if new != trainer.plan.global_batch:
            trainer.change_batch(new)

    def log_decision(self, trainer, new: int) -> None:
        """A ``batch_decision`` record and a line whenever the reason for keeping (or growing) the batch
        changes: the user sees B_noise and what the schedule waits for."""
        reason = self.schedule.reason
        if reason == self.reason:
            return
        self.reason = reason
        b_noise = trainer.noise.b_noise
        trainer.logger.log({"kind": "batch_decision", "step": trainer.step, "tokens": trainer.tokens,
                            "global_batch": trainer.plan.global_batch, "next_global_batch": new,
                            "noise_scale": b_noise, "reason": reason})
        noise = "not measured" if b_noise is None else f"{b_noise:.1f}"
        verb = "grows" if new != trainer.plan.global_batch else "keeps"
        trainer.progress.write(f"batch schedule auto {verb} global batch {trainer.plan.global_batch}"
                               f"{f' -> {new}' if verb == 'grows' else ''} at step {trainer.step}: B_noise {noise}; "
                               f"{reason}")

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

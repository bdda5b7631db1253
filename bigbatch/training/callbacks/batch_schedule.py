"""A batch-size schedule (fixed entries or automatic) put in force between two steps."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback


class BatchSchedule(Callback):
    """Between two steps, the schedule's batch (:mod:`bigbatch.scaling.batch_schedule`) through
    ``trainer.request_batch``. A fixed schedule changes at the first step past each entry's tokens.
    ``auto`` judges every noise-scale measurement in order; its measurements are read at sync points,
    at least every ``decide_every`` steps, so a growth takes effect at most ``decide_every - 1`` steps
    after the measurement that called for it. It keeps its state across a resume."""

    state_key = "batch_schedule"
    priority = 80

    def __init__(self, schedule, auto: bool, log_every: int = 1, decide_every: int = 1):
        self.schedule, self.auto, self.log_every, self.decide_every = schedule, auto, log_every, decide_every
        self.reason = None  # an automatic schedule's last decision logged
        self.grown = False  # a growth was decided since the last sync point

    def resume_batch(self, trainer, saved: int, planned: int) -> int:
        """An automatic schedule continues with the saved batch, a fixed one with its batch at the
        tokens seen."""
        return saved if self.auto else self.schedule.batch_at(trainer.tokens)

    def _fixed_batch(self, trainer) -> int:
        batch = self.schedule.batch_at(trainer.tokens)
        return batch if trainer.batch_limit is None else min(batch, trainer.batch_limit)

    def wants_sync(self, trainer) -> bool:
        if self.auto:
            return trainer.step % self.decide_every == 0
        return self._fixed_batch(trainer) != trainer.plan.global_batch

    def on_measure(self, trainer, step: int, tokens: int, b_noise: float | None) -> None:
        if not self.auto or self.grown or trainer.done():
            return
        new = self.schedule.next_batch(tokens, trainer.plan.global_batch, b_noise)
        self.log_decision(trainer, step, tokens, b_noise, new)
        if new != trainer.plan.global_batch:
            self.grown = True
            trainer.request_batch(new)

    def on_sync(self, trainer, values: dict) -> None:
        self.grown = False
        if not self.auto and not trainer.done():
            trainer.request_batch(self._fixed_batch(trainer))

    def log_decision(self, trainer, step: int, tokens: int, b_noise: float | None, new: int) -> None:
        """A ``batch_decision`` record and a line at each growth, and on logging steps (``log_every``)
        when the reason for keeping the batch changed: the user sees B_noise and what the schedule
        waits for."""
        reason = self.schedule.reason
        grows = new != trainer.plan.global_batch
        if not grows and (reason == self.reason or step % self.log_every):
            return
        self.reason = reason
        trainer.log({"kind": "batch_decision", "step": step, "tokens": tokens,
                     "global_batch": trainer.plan.global_batch, "next_global_batch": new,
                     "noise_scale": b_noise, "reason": reason})
        noise = "not measured" if b_noise is None else f"{b_noise:.1f}"
        verb = "grows" if grows else "keeps"
        trainer.say(f"batch schedule auto {verb} global batch {trainer.plan.global_batch}"
                    f"{f' -> {new}' if verb == 'grows' else ''} at step {step}: B_noise {noise}; {reason}")

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

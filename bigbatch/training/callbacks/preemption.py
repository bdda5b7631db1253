"""SIGTERM / SIGUSR1: save a checkpoint at the next agreement and exit for a requeue."""

from __future__ import annotations

import signal

from bigbatch.training.callbacks.base import Callback, StepResult


class Preemption(Callback):
    """Installs the handlers at construction. The ranks agree on whether any of them saw a signal at a
    sync point every ``every_steps`` steps (None: as many steps as take about ``every_s`` seconds, at
    least one; the count follows the step time measured, the same on every rank); after a signal,
    every rank saves and the run ends with ``exit_code`` (the scheduler scripts requeue on it)."""

    priority = 70

    def __init__(self, exit_code: int, every_steps: int | None = None, every_s: float = 2.0,
                 signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.exit_code, self.every_steps, self.every_s = exit_code, every_steps, every_s
        self.signum = None
        self.interval = every_steps or 1
        self.last = 0  # the step of the last agreement
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def post_step(self, trainer, result: StepResult) -> None:
        trainer.agree("preemption/signal", 0.0 if self.signum is None else 1.0, "max")
        trainer.agree("preemption/step_s", result.seconds, "mean")

    def wants_sync(self, trainer) -> bool:
        return trainer.step - self.last >= self.interval

    def on_sync(self, trainer, values: dict) -> None:
        self.last = trainer.step
        if self.every_steps is None and values["preemption/step_s"] > 0:
            self.interval = max(1, int(self.every_s / values["preemption/step_s"]))
        if not values["preemption/signal"]:
            return
        trainer.save_checkpoint("signal")
        if trainer.info.is_main:
            trainer.say(f"signal received: checkpoint saved at step {trainer.step} in "
                        f"{trainer.checkpointer.ckpt_dir}; exiting with code {self.exit_code} "
                        f"(resume with --resume {trainer.out})")
        trainer.request_stop(self.exit_code)

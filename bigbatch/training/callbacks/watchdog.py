"""The watchdog of each rank (:class:`bigbatch.training.watchdog.Watchdog`) for the loop's lifetime."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.watchdog import Watchdog


class WatchdogBeat(Callback):
    """Starts the watchdog (``trainer.watchdog``: evaluation and saves beat it too) and beats it after
    every step."""

    def __init__(self, step_timeout_s: float, signal_grace_s: float):
        self.step_timeout_s, self.signal_grace_s = step_timeout_s, signal_grace_s

    def on_start(self, trainer) -> None:
        trainer.watchdog = Watchdog(step_timeout_s=self.step_timeout_s, signal_grace_s=self.signal_grace_s,
                                    rank=trainer.info.rank, world_size=trainer.info.world_size)

    def post_step(self, trainer, result: StepResult) -> None:
        trainer.watchdog.beat("training step", trainer.step)

    def close(self, trainer) -> None:
        if trainer.watchdog is not None:
            trainer.watchdog.close()
            trainer.watchdog = None

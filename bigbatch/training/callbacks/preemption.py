"""SIGTERM / SIGUSR1: save a checkpoint at the next step boundary and exit for a requeue."""

from __future__ import annotations

import signal

from bigbatch import distributed as bbdist
from bigbatch.training.callbacks.base import Callback, StepResult


class Preemption(Callback):
    """Installs the handlers at construction; after a step at which any rank saw a signal, every rank
    saves and the run ends with ``exit_code`` (the scheduler scripts requeue on it)."""

    def __init__(self, exit_code: int, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.exit_code = exit_code
        self.signum = None
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.signum = signum

    def post_step(self, trainer, result: StepResult) -> None:
        if not bbdist.any_rank(self.signum is not None):
            return
        trainer.watchdog.reached_save_point()
        trainer.checkpointer.save(trainer)
        if trainer.info.is_main:
            trainer.progress.write(f"signal received: checkpoint saved at step {trainer.step} in "
                                   f"{trainer.checkpointer.ckpt_dir}; exiting with code {self.exit_code} "
                                   f"(resume with --resume {trainer.out})")
        trainer.stop(self.exit_code)

"""Checkpoints every N steps and at the end of the run."""

from __future__ import annotations

from bigbatch.sharding.tags import CheckpointSaveError
from bigbatch.training.callbacks.base import Callback


class Checkpointing(Callback):
    """A save every ``every_steps`` steps (not at the last, which ``at_end`` covers), at a sync point; a
    periodic save that fails stops the run or, with ``checkpoint.on_save_error: continue``, is recorded."""

    priority = 60

    def __init__(self, every_steps: int, at_end: bool):
        self.every_steps, self.at_end = every_steps, at_end

    def wants_sync(self, trainer) -> bool:
        return bool(self.every_steps) and trainer.step % self.every_steps == 0 and not trainer.done()

    def on_sync(self, trainer, values: dict) -> None:
        if self.wants_sync(trainer):
            trainer.save_checkpoint("periodic")

    def on_end(self, trainer) -> None:
        trainer.checkpointer.wait()  # a periodic save still completing in the background
        if self.at_end:
            trainer.save_checkpoint("end")

    def close(self, trainer) -> None:
        """A run that stops early still completes (or fails cleanly) a save running in the background."""
        try:
            trainer.engine.wait_saves()
        except CheckpointSaveError as exc:
            trainer.say(f"warning: {exc}")

"""When the loop evaluates: every N steps or every N tokens, and always at the end."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback


class Evaluation(Callback):
    """:meth:`Trainer.evaluate <bigbatch.training.loop.Trainer.evaluate>` every ``every_steps`` steps,
    or every ``every_tokens`` tokens after the start (``at_start``: at the start too, unless a resume
    starts past step 0 with ``every_steps``), and at the end unless the last step was just evaluated.
    An evaluation step is a sync point, after the train record of that step."""

    priority = 50

    def __init__(self, *, every_steps: int = 0, every_tokens: int = 0, at_start: bool = False):
        self.every_steps, self.every_tokens, self.at_start = every_steps, every_tokens, at_start
        self.origin = 0

    def on_start(self, trainer) -> None:
        self.origin = trainer.tokens
        if self.at_start and (self.every_tokens or trainer.step == 0):
            trainer.evaluate()

    def due(self, trainer) -> bool:
        if trainer.done():
            return False  # on_end evaluates
        if self.every_tokens:
            return (trainer.tokens - self.origin) % self.every_tokens == 0
        return bool(self.every_steps) and trainer.step % self.every_steps == 0

    def wants_sync(self, trainer) -> bool:
        return self.due(trainer)

    def on_sync(self, trainer, values: dict) -> None:
        if self.due(trainer):
            trainer.evaluate()

    def on_end(self, trainer) -> None:
        if trainer.last_eval is None or trainer.last_eval["step"] != trainer.step:
            trainer.evaluate()

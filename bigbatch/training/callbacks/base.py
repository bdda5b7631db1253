"""The hooks a :class:`~bigbatch.training.loop.Trainer` calls on its callbacks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepResult:
    """What one optimizer step gave: ``loss`` (mean cross-entropy on this rank, nats/token),
    ``grad_norm`` (global L2 norm before clipping), ``measured`` (the noise scale was measured),
    ``last`` (the run's budget is reached with this step)."""

    loss: float
    grad_norm: float
    measured: bool
    last: bool


class Callback:
    """A behaviour of the training loop. Every hook does nothing by default; the Trainer calls each
    hook on its callbacks in list order.

    A callback whose state must survive a resume sets ``state_key`` and implements
    :meth:`state_dict` / :meth:`load_state_dict`: the checkpoint holds that state under the key.
    """

    state_key: str | None = None

    def on_restore(self, trainer) -> None:
        """After the checkpoint (if any) is restored and its batch moved to the one in force, before
        any output is written: configure the run (budget, lr clock, hyperparameters)."""

    def resume_batch(self, trainer, saved: int, planned: int) -> int:
        """The global batch a resumed run continues with, given the checkpoint's and the plan's."""
        return planned

    def on_start(self, trainer) -> None:
        """Outputs exist (logger, progress); the first step comes next."""

    def pre_step(self, trainer) -> None:
        """Before the lr is set and the step runs."""

    def post_step(self, trainer, result: StepResult) -> None:
        """After each step. ``trainer.stop(code)`` ends the run after this hook."""

    def record_sums(self, trainer) -> list[float]:
        """Numbers to add up over ranks for the next train record (one all-reduce for every callback)."""
        return []

    def record_fields(self, trainer, sums: list[float]) -> dict:
        """Fields of the train record from this callback's summed :meth:`record_sums`."""
        return {}

    def eval_fields(self, trainer) -> dict:
        """More fields for the eval record being made (collective: every rank calls it)."""
        return {}

    def post_eval(self, trainer, record: dict) -> None:
        """After an evaluation, with its record."""

    def on_end(self, trainer) -> None:
        """The budget is reached (not called after a stop)."""

    def close(self, trainer) -> None:
        """Always, last, after the end or a stop."""

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

"""The hooks a :class:`~bigbatch.training.loop.Trainer` calls on its callbacks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepResult:
    """What one optimizer step gave, left on the device: ``metrics`` by name (``loss``, ``grad_norm``,
    scalar tensors: :class:`~bigbatch.sharding.training_engine.StepOutput`), ``applied`` (the step changed
    the weights: a bool, or a bool tensor), ``last`` (the run's budget is reached with this step),
    ``seconds`` (the step's time on the host: the hooks before it, its lr and the engine's step)."""

    metrics: dict
    applied: object
    last: bool
    seconds: float = 0.0


class Callback:
    """A behaviour of the training loop. Every hook does nothing by default; the Trainer calls each
    hook on its callbacks in ``priority`` order (lower first; equal priorities keep list order).

    A callback acts through the Trainer's commands (``record``, ``log``, ``say``, ``request_stop``,
    ``request_batch``, ``limit_batch``, ``save_checkpoint``, ...), never by writing its fields. A step
    reads nothing from the device: values a callback needs are added with ``trainer.record`` (or
    ``trainer.agree``) and come back reduced over the ranks in :meth:`on_sync`, at the next sync point
    (a step at which some callback's :meth:`wants_sync` is true, and the last).

    A callback whose state must survive a resume sets ``state_key`` and implements
    :meth:`state_dict` / :meth:`load_state_dict`: the checkpoint holds that state under the key.
    """

    state_key: str | None = None
    priority: int = 50

    def on_restore(self, trainer) -> None:
        """After the checkpoint (if any) is restored and its batch moved to the one in force, before
        any output is written: configure the run (budget, lr clock, hyperparameters)."""

    def resume_batch(self, trainer, saved: int, planned: int) -> int:
        """The global batch a resumed run continues with, given the checkpoint's and the plan's."""
        return planned

    def on_start(self, trainer) -> None:
        """Outputs exist (logger, progress, watchdog); the first step comes next."""

    def pre_step(self, trainer) -> None:
        """Before the lr is set and the step runs."""

    def post_step(self, trainer, result: StepResult) -> None:
        """After each step, before the sync point if this step is one. Reads nothing."""

    def wants_sync(self, trainer) -> bool:
        """Whether the step just taken must be a sync point for this callback."""
        return False

    def on_measure(self, trainer, step: int, tokens: int, b_noise: float | None) -> None:
        """At a sync point, once per noise-scale measurement taken since the last one, in step order:
        the smoothed ``b_noise`` after the measurement of ``step`` (ending at ``tokens``)."""

    def on_sync(self, trainer, values: dict) -> None:
        """At a sync point: ``values`` are the recorded names reduced over the steps and the ranks."""

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

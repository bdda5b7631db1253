"""AdaBound's bounds in the train records: the share of coordinates whose step size they clip."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult


class BoundCounts(Callback):
    """``clipped_lower`` / ``clipped_upper`` in every train record of an optimizer with
    ``bound_counts()`` (AdaBound, AMSBound): counted on the device at the log step, each rank over
    its own shard, and summed over the ranks with the record."""

    def post_step(self, trainer, result: StepResult) -> None:
        counts = getattr(trainer.engine.optimizer, "bound_counts", None)
        if counts is None or not trainer.log_step:
            return
        lower, upper, total = counts()
        # the share of every rank's coordinates (a rank may hold none: weight 0)
        trainer.record("clipped_lower", lower, "ratio", weight=total)
        trainer.record("clipped_upper", upper, "ratio", weight=total)

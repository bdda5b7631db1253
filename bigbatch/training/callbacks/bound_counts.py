"""AdaBound's bounds in the train records: the share of coordinates whose step size they clip."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback


class BoundCounts(Callback):
    """``clipped_lower`` / ``clipped_upper`` in every train record of an optimizer with
    ``bound_counts()`` (AdaBound, AMSBound); each rank counts its own shard."""

    def record_sums(self, trainer) -> list[float]:
        counts = getattr(trainer.engine.optimizer, "bound_counts", None)
        return list(counts()) if counts is not None else []

    def record_fields(self, trainer, sums: list[float]) -> dict:
        lower, upper, total = sums
        return {"clipped_lower": lower / total, "clipped_upper": upper / total} if total > 0 else {}

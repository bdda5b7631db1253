"""Per-source evaluation of a data mixture (``data.source: prepared`` with several sources)."""

from __future__ import annotations

from bigbatch.data.mixture import source_fields
from bigbatch.training.callbacks.base import Callback


class SourceEval(Callback):
    """``eval_loss/<source>`` (each source's held-out blocks) and ``tokens/<source>`` (tokens of each
    source consumed so far) in every eval record; nothing for a single source."""

    priority = 45

    def eval_fields(self, trainer) -> dict:
        return source_fields(trainer.engine, trainer.data, trainer.loader.samples_seen, trainer.plan.micro_batch,
                             trainer.info, trainer.cfg.train.eval_blocks)

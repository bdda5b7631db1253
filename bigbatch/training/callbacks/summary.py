"""The run's last words: final eval loss and perplexity, the loss plot, where the metrics are."""

from __future__ import annotations

import os

from bigbatch.training.callbacks.base import Callback
from bigbatch.training.metrics import plot_losses


class FinalSummary(Callback):
    """On the main rank at the end: ``final eval: ...``, ``loss.png`` (``plot``, titled ``title``
    and the batch) and the metrics path."""

    priority = 100

    def __init__(self, plot: bool, title: str, batch_schedule: str | None = None):
        self.plot, self.title, self.batch_schedule = plot, title, batch_schedule

    def on_end(self, trainer) -> None:
        if not trainer.info.is_main:
            return
        ev = trainer.last_eval
        msg = f"final eval: loss {ev['eval_loss']:.4f} | perplexity {ev['eval_ppl']:.2f} | step {trainer.step}"
        metrics = os.path.join(trainer.out, "metrics.jsonl")
        if self.plot:
            batch = (f"batch schedule {self.batch_schedule}" if self.batch_schedule is not None
                     else f"global batch {trainer.plan.global_batch}")
            png = plot_losses(metrics, os.path.join(trainer.out, "loss.png"), title=f"{self.title}, {batch}")
            msg += f"\nloss curves: {png}"
        print(msg + f"\nmetrics: {metrics}", flush=True)

"""Train records: the engine's step metrics averaged over a window of steps and the ranks, every
``train.log_every`` steps and at the last."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.metrics import hparam_fields

#: how each of the engine's step metrics is reduced over a record's window (default: mean)
REDUCE = {"grad_norm": "last"}


class TrainMetrics(Callback):
    """A ``train`` record at every log step: the engine's metrics (``loss`` averaged over the window and
    the ranks, the last step's ``grad_norm``), lr, the scaled hyperparameters, batch, tokens/s of step
    time, the noise scale, and every value callbacks added with ``trainer.record``; the progress
    display after every step."""

    priority = 20

    def post_step(self, trainer, result: StepResult) -> None:
        for name, value in result.metrics.items():
            trainer.record(name, value, REDUCE.get(name, "mean"))
        if not trainer.log_step:
            trainer.progress.update(trainer.step, None)

    def on_sync(self, trainer, values: dict) -> None:
        if not trainer.log_step:
            return
        synced = dict(trainer.synced)
        rec = {"kind": "train", "step": trainer.step, "samples": trainer.loader.samples_seen, "tokens": trainer.tokens,
               "loss": synced.pop("loss"), "lr": trainer.engine.param_groups[0]["lr"],
               **hparam_fields(trainer.hparams), "global_batch": trainer.plan.global_batch,
               "kappa": trainer.plan.kappa, "grad_norm": synced.pop("grad_norm"), "skipped_steps": trainer.skipped,
               "tokens_per_s": trainer.window.tokens_per_s(trainer.tokens_per_step)}
        if trainer.lr.noise_lr:
            rec["lr_noise_factor"] = trainer.lr.noise_factor
        if trainer.noise.b_noise is not None:
            rec["noise_scale"] = trainer.noise.b_noise  # samples (EMA, bias-corrected)
        rec.update(synced)
        trainer.log(rec)
        trainer.progress.update(trainer.step, rec)

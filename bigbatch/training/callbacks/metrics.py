"""Train records: the mean loss over a window of steps, every ``train.log_every`` steps and at the last."""

from __future__ import annotations

import time

from bigbatch import distributed as bbdist
from bigbatch.training.callbacks.base import Callback, StepResult


def hparam_fields(hparams: dict) -> dict:
    """The scaled constants beside lr, as flat record fields (``betas`` -> ``beta1``, ``beta2``)."""
    out = {}
    for k, v in hparams.items():
        if isinstance(v, (list, tuple)):
            out.update({f"beta{i + 1}" if k == "betas" else f"{k}_{i}": x for i, x in enumerate(v)})
        elif k != "lr" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


class TrainMetrics(Callback):
    """A ``train`` record (loss averaged over the window and the ranks, lr, the scaled hyperparameters,
    batch, gradient norm, tokens/s of step time, the noise scale, and every callback's
    :meth:`~Callback.record_fields`) every ``every`` steps and at the last; the progress display
    after every step."""

    def __init__(self, every: int):
        self.every = every
        self.loss, self.steps, self.seconds = 0.0, 0, 0.0
        self._t0 = 0.0

    def pre_step(self, trainer) -> None:
        self._t0 = time.perf_counter()

    def post_step(self, trainer, result: StepResult) -> None:
        self.seconds += time.perf_counter() - self._t0  # evaluation and checkpoint time left out
        self.loss += result.loss
        self.steps += 1
        record = None
        if trainer.step % self.every == 0 or result.last:
            record = self.record(trainer, result)
            trainer.logger.log(record)
            self.loss, self.steps, self.seconds = 0.0, 0, 0.0
        trainer.progress.update(trainer.step, record)

    def record(self, trainer, result: StepResult) -> dict:
        parts = [cb.record_sums(trainer) for cb in trainer.callbacks]
        sums = bbdist.all_reduce_floats([self.loss, *(x for p in parts for x in p)])
        rec = {"kind": "train", "step": trainer.step, "samples": trainer.loader.samples_seen, "tokens": trainer.tokens,
               "loss": sums[0] / (trainer.info.world_size * self.steps), "lr": trainer.engine.param_groups[0]["lr"],
               **hparam_fields(trainer.hparams), "global_batch": trainer.plan.global_batch,
               "kappa": trainer.plan.kappa, "grad_norm": result.grad_norm, "skipped_steps": trainer.skipped,
               "tokens_per_s": self.steps * trainer.tokens_per_step / self.seconds if self.seconds > 0 else float("nan")}
        if trainer.noise_lr:
            rec["lr_noise_factor"] = trainer.lr_noise
        if trainer.noise.b_noise is not None:
            rec["noise_scale"] = trainer.noise.b_noise  # samples (EMA, bias-corrected)
        at = 1
        for cb, p in zip(trainer.callbacks, parts):
            if p:
                rec.update(cb.record_fields(trainer, sums[at:at + len(p)]))
            at += len(p)
        return rec

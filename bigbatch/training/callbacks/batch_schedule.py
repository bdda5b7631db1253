"""A batch-size schedule (fixed entries or automatic) put in force between two steps."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.callbacks.metrics import hparam_fields
from bigbatch.training.metrics import format_hparams


def report_batch_change(trainer, old: int, report: dict, reason: str) -> None:
    """A ``batch_change`` record and a line: the batch moved from ``old`` to ``trainer.plan``'s, with the
    hyperparameters ``report`` (the engine's rescale report) says (``reason``: schedule | resume)."""
    plan, noise = trainer.plan, trainer.noise.b_noise
    trainer.logger.log({"kind": "batch_change", "reason": reason, "step": trainer.step,
                        "samples": trainer.loader.samples_seen, "tokens": trainer.tokens, "old_global_batch": old,
                        "global_batch": plan.global_batch, "kappa_change": plan.global_batch / old, "kappa": plan.kappa,
                        "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum, "noise_scale": noise,
                        "lr_peak": trainer.peak_lrs[0], "second_moments_rescaled": report.get("second_moments", 0),
                        **hparam_fields(trainer.hparams)})
    moved = ("hyperparameters kept" if report.get("kept") else
             f"rescaled hyperparameters: peak lr {trainer.peak_lrs[0]:.4g}, {format_hparams(hparam_fields(trainer.hparams))}"
             + (f", second moments / {plan.global_batch / old:g}" if report.get("second_moments") else ""))
    trainer.say(f"{'--resume: ' if reason == 'resume' else ''}batch change at step {trainer.step} ({trainer.tokens:,} "
                f"tokens): global batch {old} -> {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
                f"{trainer.info.world_size} (kappa {plan.kappa:g}; B_noise "
                f"{'not measured' if noise is None else f'{noise:.1f}'}); {moved}")


class BatchSchedule(Callback):
    """Between two steps, the schedule's batch (:mod:`bigbatch.scaling.batch_schedule`) through
    :meth:`Trainer.change_batch <bigbatch.training.loop.Trainer.change_batch>`. ``auto`` decides on
    each noise-scale measurement and keeps its state across a resume."""

    state_key = "batch_schedule"

    def __init__(self, schedule, auto: bool, log_every: int = 1):
        self.schedule, self.auto, self.log_every = schedule, auto, log_every
        self.reason = None  # an automatic schedule's last decision logged

    def resume_batch(self, trainer, saved: int, planned: int) -> int:
        """An automatic schedule continues with the saved batch, a fixed one with its batch at the
        tokens seen."""
        return saved if self.auto else self.schedule.batch_at(trainer.tokens)

    def post_step(self, trainer, result: StepResult) -> None:
        if result.last:
            return
        if self.auto:
            if not result.measured:
                return
            new = self.schedule.next_batch(trainer.tokens, trainer.plan.global_batch, trainer.noise.b_noise)
            self.log_decision(trainer, new)
        else:
            new = self.schedule.batch_at(trainer.tokens)
        if trainer.batch_limit is not None:  # the nodes in hand take no more (scale_out after a lost node)
            new = min(new, trainer.batch_limit)
        if new != trainer.plan.global_batch:
            trainer.change_batch(new)

    def log_decision(self, trainer, new: int) -> None:
        """A ``batch_decision`` record and a line at each growth, and on logging steps (``log_every``)
        when the reason for keeping the batch changed: the user sees B_noise and what the schedule
        waits for."""
        reason = self.schedule.reason
        grows = new != trainer.plan.global_batch
        if not grows and (reason == self.reason or trainer.step % self.log_every):
            return
        self.reason = reason
        b_noise = trainer.noise.b_noise
        trainer.logger.log({"kind": "batch_decision", "step": trainer.step, "tokens": trainer.tokens,
                            "global_batch": trainer.plan.global_batch, "next_global_batch": new,
                            "noise_scale": b_noise, "reason": reason})
        noise = "not measured" if b_noise is None else f"{b_noise:.1f}"
        verb = "grows" if grows else "keeps"
        trainer.progress.write(f"batch schedule auto {verb} global batch {trainer.plan.global_batch}"
                               f"{f' -> {new}' if verb == 'grows' else ''} at step {trainer.step}: B_noise {noise}; "
                               f"{reason}")

    def state_dict(self) -> dict:
        return self.schedule.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state)

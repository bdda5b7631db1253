"""Learning-rate schedules defined in samples (or tokens), so a batch change changes steps only.

A :class:`SampleSchedule` maps the number of samples processed to a factor of the base lr. Its
:meth:`~SampleSchedule.lr_lambda` turns it into a ``torch.optim.lr_scheduler.LambdaLR`` factor
function for a given global batch (samples, or tokens, per optimizer step)::

    sched = SampleSchedule(warmup=2_000_000, total=300_000_000, decay="cosine", unit="tokens")
    LambdaLR(opt, sched.lr_lambda(tokens_per_step))

Doubling the batch halves the number of steps and leaves the factor at every sample unchanged.
Step-based schedules tuned at a reference batch convert with :meth:`SampleSchedule.from_steps`
(samples = steps * reference batch, i.e. steps / kappa at the new batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Decay = Literal["constant", "cosine", "linear", "wsd"]
Unit = Literal["samples", "tokens"]
DECAYS = ("constant", "cosine", "linear", "wsd")


def _count(field: str, value: object, *, positive: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
        raise ValueError(f"{field}: expected an int {'>= 1' if positive else '>= 0'}, got {value!r}")
    return value


@dataclass(frozen=True)
class SampleSchedule:
    """Linear warmup, then constant, cosine or linear decay, or warmup-stable-decay (WSD).

    Attributes (counts in ``unit``: samples or tokens):
        warmup: length of the linear warmup from 0 to 1.
        total: length of the whole schedule; the factor stays at ``min_ratio`` after it
            (``constant`` stays at 1).
        decay: ``"constant"``, ``"cosine"`` or ``"linear"`` (from the end of warmup to ``total``), or
            ``"wsd"`` (1 until ``total - decay_length``, then linear to ``min_ratio``).
        min_ratio: final factor, in [0, 1].
        decay_length: WSD only: length of the final decay.
        unit: what the counts count; only used in messages and to document intent.
    """

    warmup: int
    total: int
    decay: Decay = "cosine"
    min_ratio: float = 0.0
    decay_length: int = 0
    unit: Unit = "samples"

    def __post_init__(self) -> None:
        _count("warmup", self.warmup)
        _count("total", self.total, positive=True)
        _count("decay_length", self.decay_length)
        if self.decay not in DECAYS:
            raise ValueError(f"decay: must be one of {DECAYS}, got {self.decay!r}")
        if self.unit not in ("samples", "tokens"):
            raise ValueError(f"unit: must be 'samples' or 'tokens', got {self.unit!r}")
        if self.warmup > self.total:
            raise ValueError(f"warmup: {self.warmup} {self.unit} exceeds total={self.total}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_ratio: must be in [0, 1], got {self.min_ratio!r}")
        if self.decay == "wsd":
            if not 0 < self.decay_length <= self.total - self.warmup:
                raise ValueError(
                    f"decay_length: for decay='wsd' must be in [1, total - warmup = {self.total - self.warmup}], "
                    f"got {self.decay_length}"
                )
        elif self.decay_length:
            raise ValueError(f"decay_length: only used by decay='wsd', got {self.decay_length} with {self.decay!r}")

    @classmethod
    def from_steps(
        cls,
        warmup_steps: int,
        total_steps: int,
        reference_global_batch: int,
        *,
        decay: Decay = "cosine",
        min_ratio: float = 0.0,
        decay_steps: int = 0,
        unit: Unit = "samples",
    ) -> SampleSchedule:
        """A step-based schedule tuned at ``reference_global_batch`` (samples or tokens per step)."""
        b = _count("reference_global_batch", reference_global_batch, positive=True)
        return cls(
            warmup=_count("warmup_steps", warmup_steps) * b,
            total=_count("total_steps", total_steps, positive=True) * b,
            decay=decay,
            min_ratio=min_ratio,
            decay_length=_count("decay_steps", decay_steps) * b,
            unit=unit,
        )

    def factor(self, done: float) -> float:
        """The lr factor after ``done`` samples (or tokens)."""
        if done < self.warmup:
            return max(done, 0.0) / self.warmup
        if self.decay == "constant":
            return 1.0
        if self.decay == "wsd":
            start = self.total - self.decay_length
            if done < start:
                return 1.0
            frac = min((done - start) / self.decay_length, 1.0)
            return 1.0 - (1.0 - self.min_ratio) * frac
        span = self.total - self.warmup
        frac = 1.0 if span == 0 else min((done - self.warmup) / span, 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * frac)) if self.decay == "cosine" else 1.0 - frac
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def total_steps(self, global_batch: int, done: int = 0) -> int:
        """Optimizer steps to reach ``total`` at ``global_batch`` per step, after ``done`` already."""
        b = _count("global_batch", global_batch, positive=True)
        return max(0, math.ceil((self.total - done) / b))

    def lr_lambda(self, global_batch: int, *, resume_step: int = 0, resume_done: int = 0) -> Callable[[int], float]:
        """LambdaLR factor function of the scheduler's step count at ``global_batch`` per step.

        After a batch change, pass the scheduler's step count at the change (``resume_step``, i.e.
        ``scheduler.last_epoch`` from the checkpoint) and the samples processed by then
        (``resume_done``); steps after it count ``global_batch`` each.
        """
        b = _count("global_batch", global_batch, positive=True)
        s0 = _count("resume_step", resume_step)
        d0 = _count("resume_done", resume_done)

        def fn(step: int) -> float:
            # LambdaLR calls with the count of steps taken, 0 at construction.
            return self.factor(d0 + (step - s0) * b)

        return fn

"""Batch-size schedules: the global batch as a function of the training position, fixed or following
the measured gradient noise scale.

The scaling rules carry hyperparameters across batch sizes only below the critical batch
(McCandlish et al. 2018), which is small at initialisation and grows as the loss falls (Merrill et
al. 2025 measured it rising, then flattening, for OLMo). A run that starts at a small batch and
grows it as the critical batch grows takes fewer optimizer steps for the same samples and loss.

* :class:`FixedBatchSchedule`: piecewise constant, ``[(position, global_batch), ...]``.
* :class:`AutoBatchSchedule`: starts at ``start`` and multiplies the batch by ``factor`` whenever
  the smoothed noise scale ``B_noise`` says the next batch is still below the critical batch:
  ``B_noise >= margin * next`` on ``patience`` consecutive measurements, at least ``min_gap``
  after the start or the previous change (train.py: the lr warmup by default, whose first steps
  measure a model at its initialisation), and never past ``maximum``. It never shrinks the batch.

Positions are counted in whatever unit the caller uses (train.py: tokens; the HF callback:
samples). What to do at a change (re-plan, rescale the hyperparameters, convert step counters) is
the caller's: :meth:`next_batch` only says which batch should be in force.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class BatchScheduleError(ValueError):
    """A schedule that cannot work; the message names the entry or setting."""


def _count(where: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value) or value < minimum:
        raise BatchScheduleError(f"{where} {value!r} must be an integer >= {minimum}")
    return int(value)


@dataclass
class FixedBatchSchedule:
    """``entries``: ``(position, global_batch)`` pairs; the batch of the last entry whose position
    has been reached is in force. The first entry must start at 0; positions strictly increase.
    ``unit`` names the position in messages (tokens, samples)."""

    entries: list[tuple[int, int]]
    unit: str = "position"

    def __post_init__(self):
        if not isinstance(self.entries, (list, tuple)) or not self.entries:
            raise BatchScheduleError(f"schedule: {self.entries!r} must be a non-empty list of "
                                     f"[{self.unit}, global_batch] pairs")
        checked = []
        for i, entry in enumerate(self.entries):
            where = f"schedule[{i}]"
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise BatchScheduleError(f"{where}: {entry!r} must be a pair [{self.unit}, global_batch]")
            pos = _count(f"{where}: {list(entry)!r}: the {self.unit}", entry[0], 0)
            batch = _count(f"{where}: {list(entry)!r}: the global batch", entry[1], 1)
            if i == 0 and pos != 0:
                raise BatchScheduleError(f"{where}: {list(entry)!r} must start at {self.unit} 0 (the batch the run "
                                         "starts with)")
            if checked and pos <= checked[-1][0]:
                raise BatchScheduleError(f"{where}: {list(entry)!r}: {self.unit} must increase (the previous entry "
                                         f"starts at {checked[-1][0]})")
            checked.append((pos, batch))
        self.entries = checked

    @property
    def start(self) -> int:
        return self.entries[0][1]

    def batches(self) -> list[int]:
        """Every batch the schedule can put in force, in order."""
        return [b for _, b in self.entries]

    def batch_at(self, position: float) -> int:
        batch = self.entries[0][1]
        for pos, b in self.entries:
            if position >= pos:
                batch = b
        return batch

    def next_batch(self, position: float, current: int, noise_scale: float | None = None) -> int:
        return self.batch_at(position)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class AutoBatchSchedule:
    """Grow the batch by ``factor`` from ``start`` up to ``maximum`` as the noise scale allows (see the
    module docstring). ``patience`` counts noise-scale measurements (optimizer steps that measured
    it); ``min_gap`` is in the caller's position unit."""

    start: int
    maximum: int
    factor: int = 2
    margin: float = 0.75
    patience: int = 10
    min_gap: int = 0
    gap_name: str = "growth_min_tokens"  # the setting min_gap comes from, as messages name it
    last_change: float = field(default=0.0, init=False)
    streak: int = field(default=0, init=False)
    reason: str = field(default="", init=False)  # why the last decision kept or grew the batch

    def __post_init__(self):
        self.start = _count("min_global_batch", self.start, 1)
        self.maximum = _count("max_global_batch", self.maximum, 1)
        self.factor = _count("growth_factor", self.factor, 2)
        self.patience = _count("growth_patience", self.patience, 1)
        self.min_gap = _count(self.gap_name, self.min_gap, 0)
        if self.maximum < self.start:
            raise BatchScheduleError(f"max_global_batch: {self.maximum} is below min_global_batch={self.start}")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin > 0):
            raise BatchScheduleError(f"growth_margin: {self.margin!r} must be a number > 0")

    def batches(self) -> list[int]:
        """``start, start*factor, ...`` up to ``maximum``."""
        out = [self.start]
        while out[-1] * self.factor <= self.maximum:
            out.append(out[-1] * self.factor)
        return out

    def next_batch(self, position: float, current: int, noise_scale: float | None = None) -> int:
        """``current`` times ``factor`` once the growth condition holds, else ``current``."""
        grown = current * self.factor
        if grown > self.maximum:
            self.reason = f"at max_global_batch {self.maximum}"
            return current
        ok = noise_scale is not None and math.isfinite(noise_scale) and noise_scale >= self.margin * grown
        self.streak = self.streak + 1 if ok else 0
        if not ok:
            self.reason = f"B_noise below growth_margin {self.margin:g} x {grown}"
        elif self.streak < self.patience:
            self.reason = f"B_noise above growth_margin {self.margin:g} x {grown}, waiting for growth_patience"
        elif position - self.last_change < self.min_gap:
            self.reason = f"waiting for {self.gap_name} {self.min_gap} since the start or the last change"
        else:
            self.streak = 0
            self.last_change = position
            self.reason = f"B_noise >= growth_margin {self.margin:g} x {grown} on {self.patience} measurements"
            return grown
        return current

    def state_dict(self) -> dict:
        return {"last_change": self.last_change, "streak": self.streak}

    def load_state_dict(self, state: dict) -> None:
        self.last_change = float(state.get("last_change", 0.0))
        self.streak = int(state.get("streak", 0))


BatchSchedule = FixedBatchSchedule | AutoBatchSchedule

"""A torch profiler trace of a window of steps, per rank, for Chrome's trace viewer or Perfetto."""

from __future__ import annotations

import os

from torch.profiler import ProfilerActivity, profile, record_function

from bigbatch import atomic
from bigbatch.training.callbacks.base import Callback, StepResult


class StepProfiler(Callback):
    """``torch.profiler`` over steps ``first``..``last`` (inclusive, counted from 1), CPU activity and CUDA
    activity where a GPU is in use, written as a Chrome trace (JSON) to ``OUT/profile/rank{R}.json`` after
    step ``last``, or at the close of a run that stops inside the window; each step is a range named
    ``step N`` (from this callback's ``pre_step`` to its ``post_step``). A resumed run past ``first``
    profiles the rest of the window; a run that ends before ``first`` writes nothing."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.prof: profile | None = None
        self.range: record_function | None = None

    def pre_step(self, trainer) -> None:
        if self.prof is None and self.first <= trainer.step + 1 <= self.last:
            activities = [ProfilerActivity.CPU]
            if trainer.info.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self.prof = profile(activities=activities)
            self.prof.__enter__()
        if self.prof is not None:
            self.range = record_function(f"step {trainer.step + 1}")
            self.range.__enter__()

    def post_step(self, trainer, result: StepResult) -> None:
        self._end_range()
        if self.prof is not None and trainer.step >= self.last:
            self._write(trainer)

    def _end_range(self) -> None:
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None

    def close(self, trainer) -> None:
        if self.prof is not None:
            self._write(trainer)

    def _write(self, trainer) -> None:
        self._end_range()
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        path = os.path.join(trainer.out, "profile", f"rank{trainer.info.rank}.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic.atomic_path(path) as tmp:  # a reader never sees half a trace
            prof.export_chrome_trace(tmp)
        trainer.say(f"profile of steps {self.first}..{min(self.last, trainer.step)}: "
                    f"{os.path.join(os.path.dirname(path), 'rank*.json')}")

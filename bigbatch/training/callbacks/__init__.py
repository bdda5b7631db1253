"""The training loop's behaviours, one small class each (:class:`Callback`); :func:`default_callbacks`
builds those a run config asks for (the Trainer calls them in ``priority`` order)."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.callbacks.batch_schedule import BatchSchedule
from bigbatch.training.callbacks.bound_counts import BoundCounts
from bigbatch.training.callbacks.checkpointing import Checkpointing
from bigbatch.training.callbacks.critical_batch import CriticalBatchWarning
from bigbatch.training.callbacks.evaluation import Evaluation
from bigbatch.training.callbacks.grad_spike import GradNormSpike
from bigbatch.training.callbacks.hf_export import HFExport
from bigbatch.training.callbacks.metrics import TrainMetrics
from bigbatch.training.callbacks.preemption import Preemption
from bigbatch.training.callbacks.profiler import StepProfiler
from bigbatch.training.callbacks.scale_out import ScaleOut
from bigbatch.training.callbacks.skipped_steps import SkippedSteps
from bigbatch.training.callbacks.source_eval import SourceEval
from bigbatch.training.callbacks.summary import FinalSummary
from bigbatch.training.callbacks.throughput import Throughput
from bigbatch.training.config import RunConfig

__all__ = ["Callback", "StepResult", "BatchSchedule", "BoundCounts", "Checkpointing", "CriticalBatchWarning",
           "Evaluation", "GradNormSpike", "HFExport", "TrainMetrics", "Preemption", "ScaleOut", "SkippedSteps",
           "SourceEval", "StepProfiler", "FinalSummary", "Throughput", "default_callbacks"]


def default_callbacks(cfg: RunConfig, *, evaluation: Evaluation | None = None) -> list[Callback]:
    """The callbacks of a ``train.py`` run of ``cfg`` (``evaluation`` replaces the config's cadence)."""
    t, c, b = cfg.train, cfg.checkpoint, cfg.batch
    callbacks: list[Callback] = [
        SkippedSteps(t.max_skipped_steps),
        TrainMetrics(),
        Throughput(peak_tflops=t.peak_tflops),
        BoundCounts(),
        CriticalBatchWarning(t.noise_scale_warn_factor),
        *([GradNormSpike(t.grad_spike_factor)] if t.grad_spike_factor else []),
        *([SourceEval()] if cfg.data.source == "prepared" else []),
        evaluation or Evaluation(every_steps=t.eval_every, at_start=t.eval_at_start),
        Checkpointing(c.every_steps, c.at_end),
        Preemption(c.preempt_exit_code, every_steps=c.signal_every_steps),
        *([HFExport()] if c.export_hf and c.at_end else []),
    ]
    schedule = b.batch_schedule()
    if schedule is not None:
        callbacks.append(BatchSchedule(schedule, auto=b.schedule == "auto", log_every=t.log_every,
                                       decide_every=b.decide_every))
    callbacks += [ScaleOut(cfg)] if cfg.scale_out.max_nodes else []  # after the schedule: sees its batch
    callbacks += [StepProfiler(*t.profile_steps)] if t.profile_steps else []
    callbacks.append(FinalSummary(cfg.logging.plot, f"{cfg.model.arch} {cfg.optim.name}",
                                  None if schedule is None else str(b.schedule)))
    return callbacks

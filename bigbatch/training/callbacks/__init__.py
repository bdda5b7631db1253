"""The training loop's behaviours, one small class each (:class:`Callback`); :func:`default_callbacks`
builds those a run config asks for, in the order the Trainer calls them."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.callbacks.batch_schedule import BatchSchedule
from bigbatch.training.callbacks.bound_counts import BoundCounts
from bigbatch.training.callbacks.checkpointing import Checkpointing
from bigbatch.training.callbacks.critical_batch import CriticalBatchWarning
from bigbatch.training.callbacks.evaluation import Evaluation
from bigbatch.training.callbacks.grad_spike import GradNormSpike
from bigbatch.training.callbacks.hf_export import HFExport
from bigbatch.training.callbacks.metrics import TrainMetrics, hparam_fields
from bigbatch.training.callbacks.preemption import Preemption
from bigbatch.training.callbacks.profiler import StepProfiler
from bigbatch.training.callbacks.scale_out import ScaleOut
from bigbatch.training.callbacks.skipped_steps import SkippedSteps
from bigbatch.training.callbacks.source_eval import SourceEval
from bigbatch.training.callbacks.summary import FinalSummary
from bigbatch.training.callbacks.watchdog import WatchdogBeat
from bigbatch.training.config import RunConfig

__all__ = ["Callback", "StepResult", "BatchSchedule", "BoundCounts", "Checkpointing", "CriticalBatchWarning",
           "Evaluation", "GradNormSpike", "HFExport", "TrainMetrics", "Preemption", "ScaleOut", "SkippedSteps",
           "SourceEval", "StepProfiler", "FinalSummary", "WatchdogBeat", "default_callbacks", "hparam_fields"]


def default_callbacks(cfg: RunConfig, *, evaluation: Evaluation | None = None) -> list[Callback]:
    """The callbacks of a ``train.py`` run of ``cfg`` (``evaluation`` replaces the config's cadence)."""
    t, c = cfg.train, cfg.checkpoint
    callbacks: list[Callback] = [
        SkippedSteps(t.max_skipped_steps),
        WatchdogBeat(t.step_timeout_s, c.signal_grace_s),
        TrainMetrics(t.log_every),
        BoundCounts(),
        CriticalBatchWarning(t.noise_scale_warn_factor),
    ]
    if t.grad_spike_factor:
        callbacks.append(GradNormSpike(t.grad_spike_factor))
    callbacks += [
        *([SourceEval()] if cfg.data.source == "prepared" else []),
        evaluation or Evaluation(every_steps=t.eval_every, at_start=t.eval_at_start),
        Checkpointing(c.every_steps, c.at_end),
        Preemption(c.preempt_exit_code),
    ]
    if c.export_hf and c.at_end:
        callbacks.append(HFExport())
    schedule = cfg.batch.batch_schedule()
    if schedule is not None:
        callbacks.append(BatchSchedule(schedule, auto=cfg.batch.schedule == "auto", log_every=t.log_every))
    callbacks += [ScaleOut(cfg)] if cfg.scale_out.max_nodes else []  # after the schedule: sees its batch
    callbacks += [StepProfiler(*t.profile_steps)] if t.profile_steps else []
    callbacks.append(FinalSummary(cfg.logging.plot, f"{cfg.model.arch} {cfg.optim.name}",
                                  None if schedule is None else str(cfg.batch.schedule)))
    return callbacks

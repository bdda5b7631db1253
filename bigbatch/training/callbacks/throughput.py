"""Model FLOPs utilisation and peak memory in every train record."""

from __future__ import annotations

from bigbatch.training.callbacks.base import Callback, StepResult
from bigbatch.training.flops import device_peak_tflops, flops_per_token, peak_memory_gb


class Throughput(Callback):
    """``mfu`` (model FLOPs per token x tokens/s / (peak FLOP/s x devices); null where the device's
    peak is unknown: a CPU without ``train.peak_tflops``), ``model_tflops`` (achieved TFLOP/s per
    device) and ``mem_gb`` (the largest peak memory of any rank since the last record: CUDA memory
    allocated, or resident memory on a CPU) in every train record. Host numbers only: nothing is read
    from the device."""

    priority = 25

    def __init__(self, peak_tflops: float | None = None):
        self.peak_tflops = peak_tflops
        self.flops = None  # per token, for the model and sequence length of the run

    def on_start(self, trainer) -> None:
        self.flops = flops_per_token(trainer.model, trainer.data.seq_len)
        if self.peak_tflops is None:
            self.peak_tflops = device_peak_tflops(trainer.info.device, trainer.engine.precision)

    def post_step(self, trainer, result: StepResult) -> None:
        if not trainer.log_step:
            return
        tokens_per_s = trainer.window.tokens_per_s(trainer.tokens_per_step)
        achieved = self.flops * tokens_per_s / trainer.info.world_size  # FLOP/s per device
        trainer.record("model_tflops", achieved / 1e12, "last")
        trainer.record("mfu", achieved / (self.peak_tflops * 1e12) if self.peak_tflops else float("nan"), "last")
        trainer.record("mem_gb", peak_memory_gb(trainer.info.device), "max")

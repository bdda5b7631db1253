"""What a step costs: model FLOPs per token, the peak FLOP/s of known accelerators, peak memory."""

from __future__ import annotations

import torch

from bigbatch.scaling.memory import GPUS, gpu_named
from bigbatch.training.model import count_parameters


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 L d T`` (forward and backward of every matmul weight, and of
    attention's scores and values; PaLM, appendix B). ``N`` counts the weights that multiply: every
    parameter but the input embedding's lookup, plus the output head when it shares that matrix."""
    cfg = getattr(model, "config", None)
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    lookup = count_parameters(embeddings[0]) if embeddings else 0
    total = count_parameters(model)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n = total - lookup + (lookup if tied else 0)
    layers = getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0)
    hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0)
    return 6.0 * n + 12.0 * layers * hidden * seq_len


def device_peak_tflops(device: torch.device, precision: str) -> float | None:
    """The dense peak TFLOP/s of ``device`` at ``precision`` (:data:`~bigbatch.scaling.memory.GPUS`: bf16;
    fp32 runs on TF32 tensor cores at half of it on each of them); None where unknown (a CPU, an unlisted
    GPU: ``train.peak_tflops`` then)."""
    key = gpu_named(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    if key is None:
        return None
    peak = GPUS[key].bf16_flops / 1e12
    return peak / 2 if precision == "fp32" else peak


_CUDA_PEAK = {"bytes": 0}  # the largest window peak so far: the allocator's counter is reset per window


def peak_memory_gb(device: torch.device) -> float:
    """The peak memory of this process (GB): on CUDA, memory allocated on ``device`` since the last call
    (the allocator's peak is reset; :func:`cuda_run_peak_bytes` keeps the largest); on a CPU, the
    resident set's high-water mark (``VmHWM``)."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _CUDA_PEAK["bytes"] = max(_CUDA_PEAK["bytes"], peak)
        return peak / 1e9
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return float("nan")


def cuda_run_peak_bytes() -> int:
    """The largest CUDA memory allocated so far in this process, across the windows of
    :func:`peak_memory_gb` and the allocator's current one."""
    return max(_CUDA_PEAK["bytes"], torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)



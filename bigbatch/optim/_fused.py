"""Choosing and compiling the update implementation of the Adam-family optimizers.

Three implementations compute the same update:

- ``"fused"``: one pass over memory. On CPU with float32 tensors, one C call per parameter
  group (:mod:`bigbatch.optim._native`). Otherwise one kernel per tensor: the elementwise update
  body compiled once by ``torch.compile`` (Inductor: Triton on CUDA, C++/OpenMP for CPU bf16)
  with dynamic shapes, and every
  per-step scalar (bias corrections, bounds, lr) enters as one small float32 tensor, so the kernel
  never recompiles as the step count or the learning rate changes. Inductor's on-disk caches make
  later processes reuse the compiled code.
- ``"foreach"``: torch's multi-tensor ``_foreach_*`` ops; no compiler needed.
- ``"single"``: the same update body as ``"fused"``, run eagerly tensor by tensor; for debugging.

``BIGBATCH_OPTIM_IMPL=fused|foreach|single`` forces a choice for every optimizer in the process.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from typing import Callable

import torch

IMPLS = ("fused", "foreach", "single")
_ENV = "BIGBATCH_OPTIM_IMPL"
_broken: set[str] = set()  # device types whose compile failed once in this process


@functools.lru_cache(maxsize=None)
def fused_supported(device_type: str) -> bool:
    """Whether torch.compile can build a kernel for this device type here."""
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    if device_type == "cpu":
        # Inductor's CPU backend compiles generated C++.
        return any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++"))
    return False


def choose_impl(params: list[torch.Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Pick an implementation for one parameter group's tensors (torch's foreach/fused flags)."""
    forced = os.environ.get(_ENV)
    if forced:
        if forced not in IMPLS:
            raise ValueError(f"{_ENV}={forced!r} is not one of {IMPLS}")
        return forced
    device_type = params[0].device.type
    if fused is None and foreach is None:
        if torch.compiler.is_compiling():
            return "single"  # the caller compiles the whole step itself
        if fused_supported(device_type) and device_type not in _broken:
            return "fused"
        return "foreach"
    if fused:
        if not fused_supported(device_type):
            raise RuntimeError(f"fused=True: torch.compile cannot build kernels for {device_type!r} tensors here")
        return "fused"
    return "foreach" if foreach else "single"


def run_fused(name: str, body: Callable, device_type: str, *args, **kwargs) -> bool:
    """Run the compiled ``body``; on a compile failure warn once, fall back, and return False."""
    if device_type in _broken:
        return False
    try:
        fn = _compiled(name, body)
        _warm_up(name, fn, args)
        fn(*args, **kwargs)
    except Exception as exc:  # a missing compiler or an Inductor bug must not stop training
        _broken.add(device_type)
        warnings.warn(f"bigbatch: compiling the {name} update failed on {device_type} ({exc!r}); "
                      "using the foreach implementation", RuntimeWarning, stacklevel=3)
        return False
    return True


_WARM_NUMEL = 1 << 20
_warmed: set[tuple] = set()


def _warm_up(name: str, fn: Callable, args: tuple) -> None:
    """Compile each kernel variant first on large 1-D dummies shaped like ``args``.

    Inductor decides from the first example it compiles for whether the loop runs in parallel;
    a small first tensor (a bias, a norm weight) would give a serial kernel that every later,
    larger tensor then uses (measured here: 2x slower on 2 threads). The per-step scalars
    (the last argument) are passed through unchanged.
    """
    tensors, scalars = args[:-1], args[-1]
    key = (name, scalars.device, tensors[0].dtype, tensors[-1] is None)  # cheap: runs every call
    if key in _warmed:
        return
    if any(t is not None and t.dim() != 1 for t in tensors):
        return  # non-contiguous tensors keep their shape: no dummy stands for them
    _warmed.add(key)
    fn(*[None if t is None else torch.zeros(_WARM_NUMEL, dtype=t.dtype, device=t.device)
         for t in tensors], scalars)


@functools.lru_cache(maxsize=None)
def _compiled(name: str, body: Callable) -> Callable:
    return torch.compile(body, dynamic=True, fullgraph=True)


def scalar_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-step scalars as one float32 tensor, shape [len(values)], on the params' device."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t

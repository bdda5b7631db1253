"""Choosing and compiling the update implementation of the Adam-family optimizers.

Three implementations compute the same update:

- ``"fused"``: one pass over memory. On CPU with float32 tensors, one C call per parameter
  group (:mod:`bigbatch.optim._native`). Otherwise (CUDA, bf16) the group's tensors are sorted by
  size and cut into chunks of up to :data:`CHUNK` tensors of one size, and the elementwise update
  of a whole chunk is one ``torch.compile`` graph (Inductor: Triton on CUDA, with its combo kernels
  fusing the chunk's tensors into one launch; C++/OpenMP on CPU). Shapes are static: the layers of
  a model repeat a few sizes, so a model compiles a handful of graphs, once, and every per-step
  scalar (bias corrections, bounds, lr) enters as one small float32 tensor, so nothing recompiles
  as the step count or the learning rate changes. Inductor's on-disk caches make later processes
  reuse the compiled code.
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


CHUNK = 8  # tensors per compiled call (and per CUDA launch)
_SIGNATURES = 64  # compiled graphs the process may hold: a few per optimizer and parameter size


def chunks(args: list[tuple]) -> list[list[int]]:
    """Indices of ``args`` (one ``(p, g, m, v, vmax)`` per parameter) in chunks of at most
    :data:`CHUNK` parameters with equal sizes, dtypes and layout: static graphs that repeat."""
    def key(i):
        p = args[i][0]
        return (p.device.type, str(p.dtype), str(args[i][2].dtype), tuple(p.shape), p.is_contiguous())

    by_key: dict[tuple, list[int]] = {}
    for i in range(len(args)):
        by_key.setdefault(key(i), []).append(i)
    return [idx[k:k + CHUNK] for idx in by_key.values() for k in range(0, len(idx), CHUNK)]


def run_fused(name: str, body: Callable, args: list[tuple], scalars: torch.Tensor) -> list[int]:
    """Update every parameter in ``args`` with the compiled ``body``, a chunk per call; returns the
    indices left undone (all of them after a compile failure on this device type, with one warning)."""
    device_type = scalars.device.type
    order = chunks(args)
    for n, idx in enumerate(order):
        if device_type in _broken:
            return [i for rest in order[n:] for i in rest]
        try:
            fn = _compiled(name, body)
            ps, gs, ms, vs, xs = (list(t) for t in zip(*(args[i] for i in idx)))
            fn(ps, gs, ms, vs, None if xs[0] is None else xs, scalars)
        except Exception as exc:  # a missing compiler or an Inductor bug must not stop training
            _broken.add(device_type)
            warnings.warn(f"bigbatch: compiling the {name} update failed on {device_type} ({exc!r}); "
                          "using the foreach implementation", RuntimeWarning, stacklevel=3)
            return [i for rest in order[n:] for i in rest]
    return []


@functools.lru_cache(maxsize=None)
def _compiled(name: str, body: Callable) -> Callable:
    def update_chunk(ps, gs, ms, vs, xs, s):
        for i in range(len(ps)):
            body(ps[i], gs[i], ms[i], vs[i], None if xs is None else xs[i], s)

    import torch._dynamo
    import torch._inductor.config

    # one graph per chunk signature (size, dtype, AMSBound or not): more than dynamo keeps by default
    for key in ("cache_size_limit", "recompile_limit"):
        if getattr(torch._dynamo.config, key, _SIGNATURES) < _SIGNATURES:
            setattr(torch._dynamo.config, key, _SIGNATURES)
    options = {"combo_kernels": True} if hasattr(torch._inductor.config, "combo_kernels") else {}
    return torch.compile(update_chunk, dynamic=False, fullgraph=True, options=options)


def scalar_tensor(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-step scalars as one float32 tensor, shape [len(values)], on the params' device."""
    t = torch.tensor(values, dtype=torch.float32)
    return t.to(device, non_blocking=True) if device.type != "cpu" else t

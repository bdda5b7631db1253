"""The CPU float32 update kernels in C (``csrc/adam_family.c``), built once per machine.

On CPU the whole parameter group is updated by one call: one pass over memory and one OpenMP
region for all its tensors, where a compiled kernel per tensor pays Python and thread start-up
costs per tensor. The library is built with the system C compiler on first use (well under a
second) into ``$BIGBATCH_KERNEL_CACHE`` (default ``~/.cache/bigbatch/kernels``), under a name
that hashes the source, the flags and this CPU's features, so that nodes of a cluster sharing a
home directory never load code built for another CPU. It is built twice, with and without software
prefetch, and the faster on this CPU (a pass over memory timed once, remembered in the cache) is
used: whether prefetching ahead of the hardware helps differs from one machine to the next.
``BIGBATCH_NATIVE_KERNELS=0`` turns the kernels off (the update then goes to the torch.compile
kernel).

The library binds to the OpenMP runtime that torch has already loaded (same soname), so torch
and these kernels share one thread pool; the thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch

from bigbatch import atomic

_SOURCE = Path(__file__).with_name("csrc") / "adam_family.c"
# -ffp-contract=off: no fused multiply-adds, so results equal torch's bit for bit.
# 256-bit vectors: as fast here as 512 (the update is bound by memory), and some CPUs lower their
# clock for 512-bit division and square roots.
_ARCH_FLAGS = {"x86_64": ["-march=native", "-mprefer-vector-width=256"], "aarch64": ["-mcpu=native"]}
_FLAGS = ["-O3", *_ARCH_FLAGS.get(platform.machine(), []), "-fopenmp", "-ffp-contract=off",
          "-fno-math-errno", "-shared", "-fPIC"]
KINDS = {"adabound": 0, "amsbound": 1, "radam": 2, "stream7": 3, "stream9": 4}  # stream*: rooflines
_ENV = "BIGBATCH_NATIVE_KERNELS"


def enabled() -> bool:
    return os.environ.get(_ENV, "1") not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bigbatch" / "kernels"
    return Path(os.environ.get("BIGBATCH_KERNEL_CACHE", default))


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


#: software prefetch in the kernel: on (2 KiB ahead) or off; which is faster depends on the CPU
PREFETCH = {"on": ["-DAHEAD=512"], "off": ["-DAHEAD=0"]}


def _key(cc: str, variant: str) -> str:
    return hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), " ".join([cc, *_FLAGS, *PREFETCH[variant]]).encode(),
                                      _cpu_features().encode()])).hexdigest()[:16]


def build(cc: str, variant: str = "on") -> Path:
    """Compile the library (``variant``: software prefetch on or off) unless this exact build is
    cached; return its path."""
    out = cache_dir() / f"adam_family-{_key(cc, variant)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Ranks of one node may build at once: each writes its own file and renames it into place.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, *PREFETCH[variant], str(_SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    fn = lib.bigbatch_adam_family_step
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 7 + [ctypes.c_int]
    lib.bigbatch_isa.restype = ctypes.c_char_p
    lib.bigbatch_isa.argtypes = []
    return lib


def _stream_ms(lib: ctypes.CDLL, bufs: list[torch.Tensor], threads: int) -> float:
    one = (ctypes.c_int64 * 1)(bufs[0].numel())
    s = (ctypes.c_float * 10)()
    ptr = [(ctypes.c_void_p * 1)(b.data_ptr()) for b in bufs]
    t0 = time.perf_counter()
    lib.bigbatch_adam_family_step(KINDS["stream7"], 1, *ptr, None, one, s, threads)
    return time.perf_counter() - t0


def prefetch_choice(cc: str) -> str:
    """``on`` or ``off``: the faster of the two builds on this CPU for a pass over 7 streams of 64 MB
    in all (past the caches), measured once per machine (interleaved, median of 9) and remembered in
    the kernel cache. ``BIGBATCH_KERNEL_PREFETCH=on|off`` chooses instead."""
    forced = os.environ.get("BIGBATCH_KERNEL_PREFETCH")
    if forced in PREFETCH:
        return forced
    memo = cache_dir() / f"prefetch-{_key(cc, 'on')}.txt"
    if memo.exists() and memo.read_text().strip() in PREFETCH:
        return memo.read_text().strip()
    libs = {v: _bind(build(cc, v)) for v in PREFETCH}
    bufs = [torch.rand(1 << 21) for _ in range(4)]  # p, g, m, v (the pass writes p, m, v)
    times: dict[str, list[float]] = {v: [] for v in PREFETCH}
    threads = torch.get_num_threads()
    for i in range(10):
        for v in (list(PREFETCH) if i % 2 else list(reversed(PREFETCH))):
            times[v].append(_stream_ms(libs[v], bufs, threads))
    best = min(PREFETCH, key=lambda v: statistics.median(times[v][1:]))
    atomic.write_text(memo, best)
    return best


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning) where no C compiler can build them."""
    if platform.system() != "Linux":
        return None  # the OpenMP runtime sharing above is what we have measured
    cc = _compiler()
    if cc is None:
        return None
    try:
        variant = prefetch_choice(cc)
        lib = _bind(build(cc, variant))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(f"bigbatch: building the native CPU optimizer kernels failed ({detail}); "
                      "using the torch.compile kernels", RuntimeWarning, stacklevel=2)
        return None
    lib.prefetch = variant
    return lib


def isa() -> str | None:
    """The vector instruction set the kernels were built for (``avx2+fma``, ``avx512f``, ``neon``...)
    and whether software prefetch is in."""
    lib = library()
    return f"{lib.bigbatch_isa().decode()}, prefetch {lib.prefetch}" if lib is not None else None


def supports(tensors: list[torch.Tensor | None]) -> bool:
    """Whether these tensors (one parameter's p, g, m, v[, vmax]) can go to the C kernel."""
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32
                             and t.is_contiguous()) for t in tensors)


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def step(kind: str, params, grads, exp_avgs, exp_avg_sqs, max_sqs, scalars: list[float]) -> bool:
    """Update the tensors in place with one call; False where the library is unavailable.

    Every list holds one entry per parameter (``max_sqs`` entries are None except for AMSBound);
    all tensors must pass :func:`supports`. ``scalars`` is the class's ``_scalars`` list.
    """
    lib = library()
    if lib is None:
        return False
    count = len(params)
    numel = (ctypes.c_int64 * count)(*[p.numel() for p in params])
    s = (ctypes.c_float * len(scalars))(*scalars)
    vmax = _pointers(max_sqs) if kind in ("amsbound", "stream9") else None
    rc = lib.bigbatch_adam_family_step(KINDS[kind], count, _pointers(params), _pointers(grads),
                                       _pointers(exp_avgs), _pointers(exp_avg_sqs), vmax, numel, s,
                                       torch.get_num_threads())
    if rc != 0:
        raise MemoryError("bigbatch: the native optimizer kernel could not allocate its chunk table")
    return True

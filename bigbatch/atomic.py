"""Files that appear whole or not at all: write to a temporary name beside the target, then rename.

A crash, a full disk or an exception mid-write leaves the previous file (or none) and removes the
temporary one; readers never see half a file. ``fsync`` also forces the bytes to the device before
the rename, for files whose loss after a power cut would matter (checkpoint metadata).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

TMP_MARK = ".tmp."  # in every temporary name, so that a directory listing can skip them


def tmp_name(path: str | os.PathLike) -> str:
    return f"{os.fspath(path)}{TMP_MARK}{os.getpid()}"


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = False) -> Iterator[str]:
    """Yield a temporary path to write; on success it is renamed to ``path``, on any error removed."""
    tmp = tmp_name(path)
    try:
        yield tmp
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> None:
    """``text`` into ``path`` atomically."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def torch_save(obj, path: str | os.PathLike, *, fsync: bool = False) -> None:
    """``torch.save(obj, path)`` atomically."""
    import torch

    with atomic_path(path, fsync=fsync) as tmp:
        torch.save(obj, tmp)

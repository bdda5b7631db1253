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


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike) -> None:
    """Give ``path`` and everything under it the modes a plain ``mkdir``/``open`` would have given:
    ``0o777 & ~umask`` for directories (and executables), ``0o666 & ~umask`` for files. A directory
    made by ``tempfile.mkdtemp`` is 0700 and ``safetensors`` writes 0600: a result renamed from
    there would be unreadable to everyone else."""
    mask = umask()
    for root, dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            f = os.path.join(root, name)
            if not os.path.islink(f):
                os.chmod(f, (0o777 if os.stat(f).st_mode & 0o111 else 0o666) & ~mask)


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

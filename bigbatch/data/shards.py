"""The prepared-data format: one directory per source, read with memory maps.

Layout of ``DIR`` (one source)::

    shard-00000.bin   tokens, raw little-endian uint16 (vocabulary <= 65536) or uint32
    shard-00000.idx   int64 end offset (in tokens) of every document in the shard
    shard-00000.json  that shard's token and document counts and xxh3 hashes (written last:
                      a shard with its .json is complete; a restarted prepare skips it)
    manifest.json     every shard, dtype, vocabulary, eos id, tokenizer fingerprint, totals

Every document ends with the tokenizer's eos token, so the concatenation of the shards in order is
exactly the token stream the in-job path packs into ``seq_len`` blocks. Nothing here depends on
``seq_len``: blocks are cut when a run opens the source.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import xxhash

from bigbatch import atomic
from bigbatch.errors import ConfigError

FORMAT = "bigbatch-tokens"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


def file_xxh3(path: str, chunk: int = 1 << 24) -> str:
    """xxh3_64 hex digest of a file, read in 16 MiB chunks."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as fh:
        while True:
            buf = fh.read(chunk)
            if not buf:
                return h.hexdigest()
            h.update(buf)


def write_shard(out_dir: str, index: int, tokens: np.ndarray, doc_ends: np.ndarray) -> dict:
    """Write shard ``index`` (tokens: 1-D array in the source's dtype; doc_ends: int64 end offset
    of each document) whole or not at all, its .json last. Returns the .json's record."""
    stem = os.path.join(out_dir, shard_stem(index))
    with atomic.atomic_path(stem + ".bin") as tmp:
        tokens.tofile(tmp)
    with atomic.atomic_path(stem + ".idx") as tmp:
        doc_ends.astype("<i8").tofile(tmp)
    rec = {"file": shard_stem(index) + ".bin", "tokens": int(tokens.size), "docs": int(doc_ends.size),
           "xxh3_bin": file_xxh3(stem + ".bin"), "xxh3_idx": file_xxh3(stem + ".idx")}
    atomic.write_text(stem + ".json", json.dumps(rec, sort_keys=True))
    return rec


def shard_record(out_dir: str, index: int) -> dict | None:
    """The .json of a finished shard, or None when it is not finished."""
    path = os.path.join(out_dir, shard_stem(index) + ".json")
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def read_manifest(path: str, where: str) -> dict:
    """The manifest of the prepared directory ``path``; ConfigError naming ``where`` if absent."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise ConfigError(f"{where}: {path!r} is not a prepared directory (no {MANIFEST}; "
                          "make one with bigbatch prepare-data, or a run of it has not finished)")
    with open(file) as fh:
        try:
            man = json.load(fh)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: {file} is not valid JSON ({exc})") from None
    if man.get("format") != FORMAT or man.get("version") != VERSION:
        raise ConfigError(f"{where}: {file} is not a {FORMAT} v{VERSION} manifest")
    return man


def verify(path: str, man: dict, where: str) -> None:
    """Refuse (ConfigError naming the file) a shard whose size or xxh3 differs from the manifest."""
    itemsize = np.dtype(man["dtype"]).itemsize
    for sh in man["shards"]:
        for ext, key, size in ((".bin", "xxh3_bin", sh["tokens"] * itemsize), (".idx", "xxh3_idx", sh["docs"] * 8)):
            file = os.path.join(path, sh["file"][:-4] + ext)
            if not os.path.isfile(file):
                raise ConfigError(f"{where}: shard file {file} is missing")
            if os.path.getsize(file) != size:
                raise ConfigError(f"{where}: shard file {file} has {os.path.getsize(file)} bytes, the manifest "
                                  f"says {size}; it is damaged: prepare the data again")
            digest = file_xxh3(file)
            if digest != sh[key]:
                raise ConfigError(f"{where}: shard file {file} has xxh3 {digest}, the manifest says {sh[key]}; "
                                  "it is damaged: prepare the data again")


class TokenBlocks:
    """Blocks ``first .. first+count-1`` of ``seq_len`` tokens of the concatenation of the shards.
    Indexing with an int array of block ids gives an array of shape (len(ids), seq_len); a block may
    span two shards. Blocks are read with ``pread``, not through a memory map: random reads through a
    map leave the kernel's read-ahead mapped into the process, so its resident memory would grow
    with the size of the data set."""

    def __init__(self, files: list[tuple[int, int]], dtype: np.dtype, seq_len: int, first: int, count: int):
        self.files = files  # (open file descriptor, tokens) of every shard
        self.starts = np.cumsum([0] + [n for _fd, n in files])  # token offset of every shard
        self.seq_len, self.first, self.count = seq_len, first, count
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, int]:
        return (self.count, self.seq_len)

    def tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens ``start .. start+n-1`` of the concatenated shards."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        size = self.dtype.itemsize
        out = np.empty(n, dtype=self.dtype)
        done = 0
        while done < n:
            fd, length = self.files[k]
            lo = start + done - int(self.starts[k])
            take = min(n - done, length - lo)
            out[done:done + take] = np.frombuffer(os.pread(fd, take * size, lo * size), dtype=self.dtype)
            done += take
            k += 1
        return out

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 0:
            return self[ids[None]][0]
        if ids.size and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"block ids outside [0, {self.count})")
        out = np.empty((ids.size, self.seq_len), dtype=self.dtype)
        for row, b in enumerate(ids):
            out[row] = self.tokens((self.first + int(b)) * self.seq_len, self.seq_len)
        return out


@dataclass
class PreparedSource:
    """One opened prepared directory: its manifest, the memory maps of its shards, its tokenizer dir."""

    name: str
    path: str
    manifest: dict
    files: list[tuple[int, int]]  # (read-only file descriptor, tokens) of every shard

    def close(self) -> None:
        """Close the shards' file descriptors (blocks made by ``blocks(arrays=True)`` stay usable)."""
        for fd, _n in self.files:
            os.close(fd)
        self.files = []

    @property
    def tokenizer_dir(self) -> str | None:
        sub = self.manifest.get("tokenizer_dir")
        return os.path.join(self.path, sub) if sub else None

    def blocks(self, seq_len: int, val_fraction: float, where: str, *,
               arrays: bool = False) -> tuple[TokenBlocks, TokenBlocks]:
        """(train, val) blocks: the stream cut into ``seq_len`` blocks (ragged tail dropped), the
        last ``val_fraction`` of them held out, exactly as the in-job path packs a corpus. ``arrays``:
        numpy views of a memory map instead (a small one-shard corpus: the in-job cache)."""
        total = int(self.manifest["tokens"])
        n_blocks = total // seq_len
        n_val = max(1, int(round(n_blocks * val_fraction)))
        if n_blocks - n_val < 1:
            raise ConfigError(f"{where}: {self.path!r} has {total} tokens, fewer than {2 * seq_len} needed for one "
                              f"training and one validation block of data.seq_len={seq_len}")
        dtype = np.dtype(self.manifest["dtype"])
        if arrays and len(self.files) == 1:
            file = os.path.join(self.path, self.manifest["shards"][0]["file"])
            flat = np.memmap(file, dtype=dtype, mode="r", shape=(n_blocks * seq_len,)).reshape(n_blocks, seq_len)
            return flat[: n_blocks - n_val], flat[n_blocks - n_val:]
        return (TokenBlocks(self.files, dtype, seq_len, 0, n_blocks - n_val),
                TokenBlocks(self.files, dtype, seq_len, n_blocks - n_val, n_val))


def open_source(path: str, name: str, where: str, *, check_hashes: bool = True) -> PreparedSource:
    """Open the prepared directory ``path`` (file descriptors, no reading); with ``check_hashes``
    every shard is hashed first and a damaged one is refused naming the file."""
    path = os.path.expanduser(path)
    man = read_manifest(path, where)
    if check_hashes:
        verify(path, man, where)
    files = [(os.open(os.path.join(path, sh["file"]), os.O_RDONLY), int(sh["tokens"])) for sh in man["shards"]]
    return PreparedSource(name, path, man, files)

"""Tokenizing into shards, in a worker process of ``bigbatch prepare-data`` or in-job.

Kept apart from :mod:`bigbatch.data.prepare` so that a spawned worker imports only numpy, tokenizers
and the shard format (no torch, no transformers): a worker starts in a fraction of a second.
"""

from __future__ import annotations

import os
import signal
import sys

import numpy as np

from bigbatch.data import shards
from bigbatch.data.sources import read_piece

ENCODE_BATCH = 1024  # documents per encode_batch call: bounds the memory of a worker

_TOK = None  # this worker's tokenizers.Tokenizer
_EOS = 0
_DTYPE = np.dtype(np.uint16)


def die_with_parent(parent: int) -> None:
    """End this worker when process ``parent`` ends, however it ends (SIGKILL included): Linux's
    PR_SET_PDEATHSIG, then a check that the parent was not already gone before it was set. Ctrl-C
    goes to the parent alone, which stops the workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def init_worker(tokenizer_json: str, eos: int, dtype: str, parent: int | None = None) -> None:
    """Load the tokenizer of this worker (one thread: the workers are the parallelism); a worker
    process (``parent``: the pid of the process that started it) dies with its parent."""
    global _TOK, _EOS, _DTYPE
    if parent is not None and parent != os.getpid():
        die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TOK, _EOS, _DTYPE = Tokenizer.from_file(tokenizer_json), eos, np.dtype(dtype)


def encode_documents(tok, eos: int, dtype: np.dtype, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document end offsets) of ``texts``, each document followed by ``eos``; ``tok`` is a
    ``tokenizers.Tokenizer`` (no special tokens added, as the in-job path has always encoded)."""
    parts, lens = [], []
    for i in range(0, len(texts), ENCODE_BATCH):
        flat: list[int] = []
        for enc in tok.encode_batch(texts[i:i + ENCODE_BATCH], add_special_tokens=False):
            ids = enc.ids
            flat.extend(ids)
            flat.append(eos)
            lens.append(len(ids) + 1)
        parts.append(np.array(flat, dtype=dtype))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    return tokens, np.cumsum(np.asarray(lens, dtype=np.int64))


def encode_piece(task: tuple) -> tuple[int, int, int]:
    """Tokenize one piece (spec, piece, its documents or None to read them, shard directory) into its
    shard with this worker's tokenizer; returns (source index, shard index, tokens)."""
    spec, piece, docs, out_dir = task
    tokens, ends = encode_documents(_TOK, _EOS, _DTYPE, read_piece(spec, piece, docs))
    shards.write_shard(out_dir, piece.index, tokens, ends)
    return piece.source, piece.index, int(tokens.size)

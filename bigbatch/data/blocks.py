"""Tokenize once, pack into fixed-length blocks, cache on disk, and feed global batches.

Cache layout: ``<cache_dir>/blocks/<key>/`` holds the corpus as one shard of the prepared-data
format (``shard-00000.bin/.idx``, ``manifest.json``: bigbatch.data.shards), where ``key`` hashes the
corpus fingerprint, the tokenizer fingerprint, ``seq_len`` and ``val_fraction``; any change makes a
new key. Corpora too large to tokenize inside the job are prepared once with ``bigbatch
prepare-data`` and trained with ``data.source: prepared`` (bigbatch.data).
Documents are joined with the tokenizer's eos token and cut into ``seq_len`` blocks (the
ragged tail is dropped); the last ``val_fraction`` of blocks is the validation split.

Data order is defined globally, independent of the world size: epoch ``e`` visits the training
blocks in ``permutation(seed, e)``; a run's position is the number of samples consumed. Resuming
at another world size (same global batch) therefore continues exactly the same sample stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from bigbatch import atomic
from bigbatch.data import shards
from bigbatch.data.encode import encode_documents
from bigbatch.data.prepare import source_manifest
from bigbatch.data.config import DataConfig
from bigbatch.errors import ConfigError
from bigbatch.data.corpus import Corpus

CACHE_VERSION = 2  # 2: the prepared-data shard format (bigbatch.data.shards)


@dataclass
class PackedData:
    """``train`` / ``val``: int arrays of shape (n_blocks, seq_len) (memory-mapped)."""

    train: np.ndarray
    val: np.ndarray
    path: str
    meta: dict

    @property
    def seq_len(self) -> int:
        return int(self.train.shape[1])


def cache_key(corpus: Corpus, tokenizer, cfg: DataConfig) -> str:
    spec = f"v{CACHE_VERSION}|{corpus.fingerprint}|{tokenizer.fingerprint}|{cfg.seq_len}|{cfg.val_fraction}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _tokenize_and_pack(corpus: Corpus, tokenizer, cfg: DataConfig, out_dir: str) -> None:
    """Tokenize every document (eos after each) into one shard of the prepared-data format
    (bigbatch.data.shards) with its manifest, in a directory that appears whole or not at all."""
    vocab = len(tokenizer)
    dtype = shards.dtype_for_vocab(vocab)
    texts = list(corpus.dataset["text"])
    tokens, ends = encode_documents(tokenizer.backend_tokenizer, tokenizer.eos_token_id, dtype, texts)
    total = int(tokens.size)
    n_blocks = total // cfg.seq_len
    n_val = max(1, int(round(n_blocks * cfg.val_fraction)))
    if n_blocks - n_val < 1:
        raise ConfigError(
            f"data: the corpus ({corpus.description}) has {total} tokens, fewer than "
            f"{2 * cfg.seq_len} needed for one training and one validation block of "
            f"data.seq_len={cfg.seq_len}; use more text or a smaller seq_len")

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".blocks-")
    try:
        record = shards.write_shard(tmp, 0, tokens, ends)
        man = source_manifest(corpus.fingerprint, "in-job", [corpus.description], 1.0, tokenizer, dtype, [record], None)
        with open(os.path.join(tmp, shards.MANIFEST), "w") as fh:
            json.dump(man, fh, indent=1, sort_keys=True)
        atomic.honour_umask(tmp)
        os.replace(tmp, out_dir)  # the directory appears complete or not at all
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(out_dir, shards.MANIFEST)):
            raise
        # else another process finished the same cache first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_packed_data(corpus: Corpus, tokenizer, cfg: DataConfig, *, build: bool = True) -> PackedData:
    """Load the packed blocks from the cache, building them first when ``build`` is true."""
    out_dir = os.path.join(os.path.expanduser(cfg.cache_dir), "blocks", cache_key(corpus, tokenizer, cfg))
    if not os.path.isfile(os.path.join(out_dir, shards.MANIFEST)):
        if not build:
            raise FileNotFoundError(f"token cache {out_dir} is missing")
        _tokenize_and_pack(corpus, tokenizer, cfg, out_dir)
    source = shards.open_source(out_dir, "corpus", "data", check_hashes=False)
    train, val = source.blocks(cfg.seq_len, cfg.val_fraction, "data", arrays=True)
    source.close()
    man = source.manifest
    meta = {"version": CACHE_VERSION, "corpus": corpus.fingerprint, "corpus_description": corpus.description,
            "tokenizer": man["tokenizer"], "vocab_size": man["vocab_size"], "seq_len": cfg.seq_len,
            "tokens": man["tokens"], "blocks": len(train) + len(val), "train_blocks": len(train),
            "val_blocks": len(val), "dtype": man["dtype"]}
    return PackedData(train=train, val=val, path=out_dir, meta=meta)


class BlockStream:
    """The global sample order over ``n_blocks`` training blocks: epoch ``e`` is
    ``randperm(n_blocks)`` seeded by (seed, e, *key). Pure function of the position, so it needs no
    state beyond the number of samples consumed. ``key`` tells apart the streams of a mixture's sources."""

    def __init__(self, n_blocks: int, seed: int, key: tuple = ()):
        self.n_blocks = n_blocks
        self.seed = seed
        self.key = tuple(key)
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, *self.key])
            # int32 where it fits: the same order as permutation(n_blocks) in half the memory
            ids = np.arange(self.n_blocks, dtype=np.int32 if self.n_blocks < 2**31 else np.int64)
            self._perm = rng.permutation(ids)
            self._epoch = epoch
        return self._perm

    def indices(self, start: int, count: int) -> np.ndarray:
        """Block indices of global samples ``start .. start+count-1``."""
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, offset = divmod(start + done, self.n_blocks)
            take = min(count - done, self.n_blocks - offset)
            out[done:done + take] = self._permutation(epoch)[offset:offset + take]
            done += take
        return out


class GlobalBatchLoader:
    """Micro batches of this rank for one optimizer step.

    A step consumes ``global_batch = micro_batch * grad_accum * world_size`` samples starting at
    ``samples_seen``; micro step ``m`` of rank ``r`` takes the slice
    ``[(m * world + r) * micro, ... + micro)`` of it. Yields LongTensors of shape
    (micro_batch, seq_len). Blocks with an order of their own (a mixture of prepared sources,
    bigbatch.data.mixture) give it by ``blocks.stream(seed)``."""

    def __init__(self, blocks: np.ndarray, *, micro_batch: int, grad_accum: int, rank: int,
                 world_size: int, seed: int, samples_seen: int = 0):
        self.blocks = blocks
        self.stream = blocks.stream(seed) if hasattr(blocks, "stream") else BlockStream(len(blocks), seed)
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.samples_seen = samples_seen

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    def next_step(self) -> list[torch.Tensor]:
        idx = self.stream.indices(self.samples_seen, self.global_batch)
        self.samples_seen += self.global_batch
        out = []
        for m in range(self.grad_accum):
            lo = (m * self.world_size + self.rank) * self.micro_batch
            rows = np.sort(idx[lo:lo + self.micro_batch])  # sorted reads are kinder to the memmap
            order = np.argsort(np.argsort(idx[lo:lo + self.micro_batch]))
            out.append(torch.from_numpy(self.blocks[rows][order].astype(np.int64)))
        return out


def eval_batches(blocks: np.ndarray, *, micro_batch: int, rank: int, world_size: int,
                 max_blocks: int) -> list[torch.Tensor]:
    """This rank's validation micro batches: the first ``max_blocks`` validation blocks, block
    ``i`` on rank ``i % world``; the evaluated set does not depend on the world size. None for
    blocks evaluated per source (a mixture of several prepared sources: bigbatch.data.mixture)."""
    if getattr(blocks, "evaluated_per_source", False):
        return []
    mine = np.arange(rank, min(max_blocks, len(blocks)), world_size)
    return [torch.from_numpy(blocks[mine[i:i + micro_batch]].astype(np.int64))
            for i in range(0, len(mine), micro_batch)]

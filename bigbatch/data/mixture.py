"""Training from prepared sources: the blocks of several sources as one indexable set, their
weighted sample order, and per-source evaluation.

Sample ``i`` of the global stream belongs to source ``pattern[i % CHUNK]``: in every chunk of
``CHUNK`` samples each source gets its quota (weight x CHUNK, largest remainders rounded up) and the
quotas are interleaved smoothly (weighted round robin), so any window of samples holds each
source's share to within a few samples. The ``j``-th sample of source ``s`` is block
``BlockStream(n_s, seed, key=s).indices(j)`` of that source. Everything is a pure function of
(seed, samples seen), independent of the world size; with one source it is exactly the in-job
order (:class:`bigbatch.data.blocks.BlockStream` over the same blocks).
"""

from __future__ import annotations

import math

import numpy as np

from bigbatch import distributed as bbdist
from bigbatch.data import shards
from bigbatch.data.entries import prepared_entries
from bigbatch.errors import ConfigError
from bigbatch.data.blocks import BlockStream, PackedData, eval_batches
from bigbatch.data.tokenizer import _finish, build_tokenizer

CHUNK = 1000  # samples per quota period; rounding a weight to 1/CHUNK moves a share by <= 0.05%


def quotas(weights: list[float], chunk: int = CHUNK) -> np.ndarray:
    """Samples per chunk of every source: ``weight / sum x chunk`` rounded by largest remainder."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * chunk
    q = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - q), kind="stable")
    q[order[: chunk - int(q.sum())]] += 1
    return q


def interleave(q: np.ndarray) -> np.ndarray:
    """Source of every position of a chunk, quotas spread evenly (smooth weighted round robin)."""
    total = int(q.sum())
    current = np.zeros(len(q), dtype=np.int64)
    out = np.empty(total, dtype=np.int64)
    for p in range(total):
        current += q
        s = int(np.argmax(current))
        current[s] -= total
        out[p] = s
    return out


class MixtureStream:
    """The global sample order over several sources; ``indices`` gives row ids of the
    concatenation of their blocks (source ``s`` starts at ``offsets[s]``)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.q = quotas(weights)
        self.pattern = interleave(self.q)
        onehot = np.eye(len(sizes), dtype=np.int64)[self.pattern]
        self.prefix = np.vstack([np.zeros(len(sizes), dtype=np.int64), np.cumsum(onehot, axis=0)])
        self.streams = [BlockStream(n, seed, key=() if s == 0 else (s,)) for s, n in enumerate(sizes)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def counts(self, n: int) -> np.ndarray:
        """Samples of every source among the first ``n`` of the stream."""
        full, rest = divmod(n, len(self.pattern))
        return full * self.q + self.prefix[rest]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Row ids of global samples ``start .. start+count-1``."""
        i = np.arange(start, start + count, dtype=np.int64)
        src = self.pattern[i % len(self.pattern)]
        nth = (i // len(self.pattern)) * self.q[src] + self.prefix[i % len(self.pattern), src]
        out = np.empty(count, dtype=np.int64)
        for s, stream in enumerate(self.streams):
            mask = src == s
            if mask.any():  # a source's samples in a window are consecutive in its own stream
                out[mask] = self.offsets[s] + stream.indices(int(nth[mask][0]), int(mask.sum()))
        return out


class MixtureBlocks:
    """The blocks of several sources as one set of rows (source ``s``'s rows follow source
    ``s-1``'s). Indexing with an int array gives shape (len(rows), seq_len); ``stream(seed)`` is
    the weighted order in which a :class:`~bigbatch.data.blocks.GlobalBatchLoader` reads them."""

    def __init__(self, names: list[str], parts: list, weights: list[float]):
        self.names, self.parts, self.weights = names, parts, weights
        self.sizes = [len(p) for p in parts]
        self.offsets = np.cumsum([0] + self.sizes)
        self.seq_len = int(parts[0].shape[1])
        self.eval_cache: dict[int, list] = {}  # micro batch -> each source's validation batches

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def evaluated_per_source(self) -> bool:
        """Two or more sources: each is evaluated on its own held-out blocks and the mixture's eval
        loss is their weighted mean (:func:`source_fields`), not a loss over the first blocks of the
        concatenation (which are the first source's alone)."""
        return len(self.parts) >= 2

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        src = np.searchsorted(self.offsets, rows, side="right") - 1
        out = np.empty((rows.size, self.seq_len), dtype=np.int64)
        for s, part in enumerate(self.parts):
            mask = src == s
            if mask.any():
                out[mask] = part[rows[mask] - self.offsets[s]]
        return out

    def stream(self, seed: int) -> MixtureStream:
        return MixtureStream(self.sizes, self.weights, seed)

    def source_tokens(self, samples: int) -> dict[str, int]:
        """Tokens of each source among the first ``samples`` samples of the stream."""
        counts = self.stream(0).counts(samples)
        return {n: int(c) * self.seq_len for n, c in zip(self.names, counts)}


def open_prepared(cfg, *, check_hashes: bool):
    """(tokenizer, PackedData) of ``data.source: prepared``: every source opened (hashes checked
    when ``check_hashes``), tokenized with the same tokenizer as the run's, cut into blocks."""
    from transformers import AutoTokenizer

    entries = prepared_entries(cfg.data)
    sources = [shards.open_source(path, name, f"data.prepared[{i}].path", check_hashes=check_hashes)
               for i, (name, path, _w) in enumerate(entries)]
    if cfg.tokenizer.kind == "pretrained":
        tok, whose = build_tokenizer(cfg.tokenizer, None, cfg.data.cache_dir), f"tokenizer.path {cfg.tokenizer.path!r}"
    else:  # the tokenizer saved with the shards
        tok, whose = _finish(AutoTokenizer.from_pretrained(sources[0].tokenizer_dir)), f"{sources[0].tokenizer_dir!r}"
    for i, src in enumerate(sources):
        if src.manifest["tokenizer"] != tok.fingerprint:
            raise ConfigError(f"data.prepared[{i}].path: {src.path!r} was prepared with tokenizer "
                              f"{src.manifest['tokenizer']}, the run's ({whose}) is {tok.fingerprint}; prepare it "
                              "again with the run's tokenizer or train with the one saved beside it")
    trains, vals = [], []
    for i, src in enumerate(sources):
        tr, va = src.blocks(cfg.data.seq_len, cfg.data.val_fraction, f"data.prepared[{i}].path")
        trains.append(tr)
        vals.append(va)
    names, weights = [e[0] for e in entries], [e[2] for e in entries]
    meta = {"sources": {n: {"path": s.path, "weight": w, "tokens": s.manifest["tokens"],
                            "train_blocks": len(tr), "val_blocks": len(va)}
                        for n, s, w, tr, va in zip(names, sources, weights, trains, vals)},
            "tokenizer": tok.fingerprint, "seq_len": cfg.data.seq_len}
    data = PackedData(train=MixtureBlocks(names, trains, weights), val=MixtureBlocks(names, vals, weights),
                      path=",".join(s.path for s in sources), meta=meta)
    return tok, data


def source_eval_losses(engine, data: PackedData, *, micro_batch: int, rank: int, world_size: int,
                       max_blocks: int, device) -> dict[str, float]:
    """Mean cross-entropy (nats/token) on each source's first ``max_blocks`` validation blocks,
    over every rank (collective); {} unless the data is a mixture of two or more sources."""
    val = data.val
    if not isinstance(val, MixtureBlocks) or len(val.parts) < 2:
        return {}
    cache = val.eval_cache
    if micro_batch not in cache:
        cache[micro_batch] = [eval_batches(p, micro_batch=micro_batch, rank=rank, world_size=world_size,
                                           max_blocks=max_blocks) for p in val.parts]
    sums = []
    for batches in cache[micro_batch]:
        sums += list(engine.eval_sums(batches, device))
    sums = bbdist.all_reduce_floats(sums)
    return {n: sums[2 * k] / max(sums[2 * k + 1], 1) for k, n in enumerate(val.names)}


def mixture_loss(losses: dict[str, float], names: list[str], weights: list[float]) -> float:
    """The mixture's loss: each source's loss weighted by its share (``weights`` normalised)."""
    w = np.asarray(weights, dtype=np.float64)
    return float(sum(wi * losses[n] for n, wi in zip(names, w / w.sum())))


def source_fields(engine, data: PackedData, samples_seen: int, micro_batch: int, info, max_blocks: int) -> dict:
    """``eval_loss/<source>`` and ``tokens/<source>`` (tokens of each source consumed so far) for an
    eval record, and the mixture's ``eval_loss`` / ``eval_ppl``: the weighted mean of the sources'
    losses (the loop evaluates nothing itself for such a mixture); {} for a single source."""
    losses = source_eval_losses(engine, data, micro_batch=micro_batch, rank=info.rank, world_size=info.world_size,
                                max_blocks=max_blocks, device=info.device)
    if not losses:
        return {}
    mixed = mixture_loss(losses, data.val.names, data.val.weights)
    tokens = data.train.source_tokens(samples_seen)
    return {"eval_loss": mixed, "eval_ppl": math.exp(min(mixed, 50.0)),
            **{f"eval_loss/{n}": v for n, v in losses.items()}, **{f"tokens/{n}": t for n, t in tokens.items()}}

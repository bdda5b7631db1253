"""The data of a run: packed in the job from a corpus (small corpora, the demo) or memory-mapped from
``bigbatch prepare-data`` shards (``data.source: prepared``). Local rank 0 does the work that writes or
verifies files, then every rank opens the result; an error there stops every rank with one message."""

from __future__ import annotations

import torch.distributed as dist

from bigbatch.data.mixture import open_prepared
from bigbatch.distributed import long_wait_group
from bigbatch.errors import ConfigError
from bigbatch.data.corpus import Corpus, load_corpus
from bigbatch.data.blocks import build_packed_data
from bigbatch.data.tokenizer import build_tokenizer


def on_local_rank0(info, work):
    """``work()`` on each node's first rank; its ConfigError or OSError is raised on every rank (the
    others wait as long as the work takes: a group without the short collective timeout). Returns
    what ``work`` returned there, None elsewhere."""
    error, result = None, None
    if info.local_rank == 0:
        try:
            result = work()
        except (ConfigError, OSError) as exc:
            error = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
    errors = [error]
    if info.world_size > 1:
        errors = [None] * info.world_size
        dist.all_gather_object(errors, error, group=long_wait_group())
    first = next((e for e in errors if e), None)
    if first:
        raise ConfigError(first)
    return result


def load_run_data(cfg, info):
    """``(tokenizer, packed data, corpus)`` for a run."""
    if cfg.data.source == "prepared":
        # nothing is tokenized; a damaged shard stops every rank before any training
        opened = on_local_rank0(info, lambda: open_prepared(cfg, check_hashes=True))
        tok, data = opened or open_prepared(cfg, check_hashes=False)
        names = ", ".join(f"{n} {s['weight']:g} ({s['tokens']:,} tokens)" for n, s in data.meta["sources"].items())
        return tok, data, Corpus(None, data.meta["tokenizer"], f"prepared: {names}")
    corpus = load_corpus(cfg.data)
    on_local_rank0(info, lambda: build_packed_data(corpus, build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir),
                                                   cfg.data))
    tok = build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir, train=False)
    return tok, build_packed_data(corpus, tok, cfg.data, build=False), corpus

"""The ``data`` and ``tokenizer`` sections of a run config: where text comes from, how it is
tokenized and packed (``bigbatch.data``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from bigbatch.data.entries import prepared_entries, source_specs
from bigbatch.errors import ConfigError, check_choice as _choice, check_positive as _positive


@dataclass
class TokenizerConfig:
    """``bpe``: byte-level BPE trained on the corpus and cached; ``pretrained``: a local
    directory or (with a network) a hub name, loaded with ``AutoTokenizer``."""

    kind: str = "bpe"  # bpe | pretrained
    path: str | None = None  # local dir or hub name, for kind=pretrained
    vocab_size: int = 2048  # for kind=bpe, including special tokens
    train_chars: int = 4_000_000  # BPE trains on at most this many characters of the corpus

    def validate(self) -> None:
        _choice("tokenizer", "kind", self.kind, ("bpe", "pretrained"))
        if self.kind == "pretrained" and not self.path:
            raise ConfigError("tokenizer.path: required when tokenizer.kind is 'pretrained' "
                              "(a local tokenizer directory or a hub name)")
        if self.kind == "bpe" and self.vocab_size < 260:
            raise ConfigError(f"tokenizer.vocab_size: {self.vocab_size} is too small for a "
                              "byte-level BPE; use >= 260 (256 bytes + special tokens)")
        _positive("tokenizer", "train_chars", self.train_chars)


@dataclass
class DataConfig:
    """Where text comes from and how it is packed.

    ``source``: ``embedded`` (text shipped with Python itself, no download; see
    bigbatch.data.blocks), ``text`` / ``json`` / ``parquet`` (local ``files``), ``hub``
    (``name``/``subset`` loaded with ``datasets.load_dataset``; needs a network once), or
    ``prepared``: token shards written by ``bigbatch prepare-data``, listed in ``prepared`` as
    ``{path, weight}`` (a mixture when several; bigbatch.data). ``sources``: what
    ``prepare-data`` reads, a list of ``{name, kind, files, weight, ...}`` (bigbatch.data.sources);
    empty = the single source above. ``workers`` / ``shard_bytes``: its processes and input bytes
    per shard.
    """

    source: str = "embedded"  # embedded | text | json | parquet | hub | prepared
    embedded: str = "stdlib"  # stdlib (docs + sources) | pydoc | kjv
    files: list[str] = field(default_factory=list)
    name: str | None = None
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 128  # tokens per packed block
    val_fraction: float = 0.05  # of blocks, the held-out tail of the corpus
    max_chars: int | None = None  # truncate the corpus (characters), None = all
    cache_dir: str = "~/.cache/bigbatch"
    num_proc: int = 1  # datasets.map workers; the fast tokenizer already uses all cores
    sources: list[dict] = field(default_factory=list)  # prepare-data inputs
    prepared: list[dict] = field(default_factory=list)  # source: prepared
    workers: int = 1  # prepare-data tokenizer processes
    shard_bytes: int = 64_000_000  # prepare-data input bytes (characters) per shard

    def validate(self) -> None:
        _choice("data", "source", self.source, ("embedded", "text", "json", "parquet", "hub", "prepared"))
        if self.source == "prepared":
            prepared_entries(self)
        if self.sources:
            source_specs(self)
        _positive("data", "workers", self.workers)
        _positive("data", "shard_bytes", self.shard_bytes)
        _choice("data", "embedded", self.embedded, ("stdlib", "pydoc", "kjv"))
        if self.source in ("text", "json", "parquet") and not self.files:
            raise ConfigError(f"data.files: required when data.source is {self.source!r}")
        if self.source == "hub" and not self.name:
            raise ConfigError("data.name: required when data.source is 'hub'")
        _positive("data", "seq_len", self.seq_len)
        _positive("data", "max_chars", self.max_chars)
        _positive("data", "num_proc", self.num_proc)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: {self.val_fraction!r} must be in (0, 1)")

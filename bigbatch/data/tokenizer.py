"""Tokenizers: a local directory, a hub name, or a byte-level BPE trained on the corpus and cached.

Every tokenizer returned has an ``eos_token_id`` (used as the document separator when packing)
and a ``fingerprint`` attribute (sha256 of its serialized form) that keys the token cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from bigbatch import atomic
from bigbatch.data.config import TokenizerConfig
from bigbatch.errors import ConfigError
from bigbatch.data.corpus import Corpus

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def _fingerprint(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:  # slow tokenizers: the vocabulary is what matters
        blob = json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _finish(tok):
    if tok.eos_token_id is None:
        raise ConfigError(f"tokenizer.path: tokenizer {tok.name_or_path!r} has no eos token; "
                          "packing needs one to separate documents")
    tok.fingerprint = _fingerprint(tok)
    return tok


def train_bpe(texts, vocab_size: int, out_dir: str):
    """Train a byte-level BPE (``tokenizers``) on an iterable of strings; save it with
    ``save_pretrained`` into ``out_dir`` atomically and return the fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tok-")
    tok.save_pretrained(tmp)
    atomic.honour_umask(tmp)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process won the race; theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


def build_tokenizer(cfg: TokenizerConfig, corpus: Corpus, cache_dir: str, *, train: bool = True):
    """Return a fast tokenizer per ``cfg``. For ``kind=bpe`` it is cached under
    ``cache_dir/tokenizers/<corpus fingerprint, vocab, train_chars>``; with ``train=False`` a
    missing cache is an error (non-zero ranks wait for rank 0 instead of training twice)."""
    from transformers import AutoTokenizer

    if cfg.kind == "pretrained":
        path = os.path.expanduser(cfg.path)
        if os.path.isdir(path):
            tok = AutoTokenizer.from_pretrained(path)
        elif os.path.exists(path) or path.startswith((".", "/", "~")):
            raise ConfigError(f"tokenizer.path: {cfg.path!r} is not a tokenizer directory")
        else:
            try:
                tok = AutoTokenizer.from_pretrained(path)
            except Exception as exc:
                raise ConfigError(f"tokenizer.path: cannot load {cfg.path!r} as a local directory "
                                  f"or a hub name (offline here?): {exc}") from None
        return _finish(tok)

    key = hashlib.sha256(f"{corpus.fingerprint}|bpe|{cfg.vocab_size}|{cfg.train_chars}".encode()).hexdigest()[:16]
    out_dir = os.path.join(os.path.expanduser(cache_dir), "tokenizers", f"bpe{cfg.vocab_size}-{key}")
    if not os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        if not train:
            raise FileNotFoundError(f"tokenizer cache {out_dir} is missing")

        def texts():
            seen = 0
            for t in corpus.texts():
                if seen >= cfg.train_chars:
                    return
                t = t[: cfg.train_chars - seen]
                seen += len(t)
                yield t

        train_bpe(texts(), cfg.vocab_size, out_dir)
    return _finish(AutoTokenizer.from_pretrained(out_dir))

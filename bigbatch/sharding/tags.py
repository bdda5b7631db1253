"""Checkpoint tags on disk, whatever engine wrote them: ``<ckpt_dir>/<tag>/`` directories, each with a
manifest of its files, the ``latest`` hint, retention, and the choice of which tag to load.

* A tag is **complete** when its manifest (``bigbatch_manifest.json``) exists: it is written last,
  by rank 0, after every rank has written its files. It lists every file with its size and a
  content hash (xxHash3-128: about 30 GB/s on one core here, so hashing adds a fraction of a
  second per GB to a save, next to the seconds the writes take).
* A complete tag is **good** when every file it lists is there with that size and hash.
  :func:`verify_tag` checks the sizes of all files and the hashes of this rank's share (every
  ``world``-th file), so the ranks of a job check a tag together; :func:`bigbatch.distributed.agree` makes
  them decide together.
* ``<ckpt_dir>/latest`` names the newest complete tag; it is only a hint. A missing, empty or
  unreadable ``latest``, or one that names a tag that is not good, costs nothing: the loaders take
  the newest good tag by the order its manifest records (samples seen, then time), and say which
  one they used and why.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import dataclass

from bigbatch import atomic
from bigbatch import distributed as bbdist
from bigbatch.rng import set_rng_state

logger = logging.getLogger(__name__)

FORMAT = "bigbatch-ckpt-1"
MANIFEST = "bigbatch_manifest.json"
LATEST = "latest"
META = "bigbatch_meta.pt"  # rank 0's description of the tag: format, world size, batch, client state
RNG = "bigbatch_rng_rank{}.pt"  # each rank's Python, NumPy and torch RNG states
HASH = "xxh3_128"
# A tag refused at a resume is renamed with this prefix: kept for inspection, but no longer a tag (it
# would count toward checkpoint.keep and let the next save delete the good one the run resumed from).
REFUSED_PREFIX = "refused-"
_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or partial; the message names the file."""


class UnsafeCheckpoint(CheckpointError):
    """A file whose pickle would call a function when loaded (not plain data): never loaded and never
    passed over for an older tag, whatever the fallback; the message names the file."""


def _numpy_rng_globals() -> list:
    """The NumPy types of a ``uint32`` array (tags whose RNG files kept NumPy's state as an array)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_file(path: str, mmap: bool = False):
    """A torch-saved file of a tag, on CPU, unpickled with ``weights_only=True``: tensors, numbers,
    strings and plain containers (and NumPy ``uint32`` arrays), never code. CheckpointError naming
    the file when it cannot be read or needs anything else (a pickle that would call a function)."""
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a corrupt pickle/zip, or one that would run code: name the file
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).lower():
            raise unsafe(path, ", ".join(unsafe_globals(path)[:4]) or "a function") from None
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None


def unsafe(path: str, names: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: refused, loading it would run code (its pickle calls {names}); a checkpoint "
                            "holds only tensors, numbers, strings and containers")


def unsafe_globals(path: str) -> list[str]:
    """The functions and classes a torch-saved file's pickle names beyond plain data and what
    :func:`load_file` allows, read from its opcodes without unpickling it."""
    import torch

    scan = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if scan is None:  # torch < 2.5: load_file's weights_only load still refuses them
        return []
    try:
        names = scan(path)
    except Exception:  # not a torch zip file: its load says why
        return []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _numpy_rng_globals()}
    return [n for n in names if n not in allowed]


def check_pickles(ckpt_dir: str, tag: str, manifest: dict) -> None:
    """Every torch-saved file of a tag (and DCP's ``.metadata``) must unpickle to plain data:
    :class:`UnsafeCheckpoint` naming the first that would call anything else. Each rank checks every
    file (the pickles are small), so all refuse together before any load."""
    from bigbatch.sharding.full_state import DCP_METADATA, dcp_metadata_globals  # it imports this module

    for rel in sorted(manifest["files"]):
        fp = os.path.join(ckpt_dir, tag, rel)
        names = unsafe_globals(fp) if rel.endswith(".pt") else dcp_metadata_globals(fp) if rel == DCP_METADATA else []
        if names:
            raise unsafe(fp, ", ".join(names[:4]))


def read_meta(ckpt_dir: str, tag: str) -> dict:
    """The tag's :data:`META` (both engines write one)."""
    return load_file(os.path.join(ckpt_dir, tag, META))


def restore_rng(path: str, rank: int) -> None:
    """This rank's RNG states from the tag directory ``path``, when it holds them."""

    rng = os.path.join(path, RNG.format(rank))
    if os.path.isfile(rng):
        set_rng_state(load_file(rng))


class NoUsableCheckpoint(CheckpointError):
    """Complete checkpoints exist but none is good; ``refused`` holds ``(tag, why)`` for each."""

    def __init__(self, ckpt_dir: str, refused: list[tuple[str, str]]):
        self.refused = refused
        lines = "".join(f"\n  {tag}: {why}" for tag, why in refused)
        super().__init__(f"no usable checkpoint in {ckpt_dir!r}; every tag was refused:{lines}")


class CheckpointSaveError(CheckpointError):
    """A save that failed on some rank; the message names the rank, the file and the OS error."""


def file_hash(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tag_files(path: str) -> list[str]:
    """Every file of a tag directory (relative paths, sorted), without the manifest and temporaries."""
    out = []
    for root, _, names in os.walk(path):
        for name in names:
            if name == MANIFEST or atomic.TMP_MARK in name:
                continue
            out.append(os.path.relpath(os.path.join(root, name), path))
    return sorted(out)


def hash_share(path: str, files: list[str], group=None) -> dict[str, str]:
    """Hashes of this rank's share of ``files`` (every world-th one); all ranks' shares gathered
    (over ``group``, default: every rank)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return {f: file_hash(os.path.join(path, f)) for f in files}
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = {f: file_hash(os.path.join(path, f)) for i, f in enumerate(files) if i % world == rank}
    if world == 1:
        return mine
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    return {k: v for part in gathered for k, v in part.items()}


def write_manifest(ckpt_dir: str, tag: str, hashes: dict[str, str], **order) -> None:
    """The manifest of a tag whose files are all written (rank 0): sizes, hashes and ``order`` (the
    position the tag was saved at, e.g. ``samples=``)."""
    path = os.path.join(ckpt_dir, tag)
    files = {f: {"bytes": os.path.getsize(os.path.join(path, f)), HASH: h} for f, h in sorted(hashes.items())}
    manifest = {"format": FORMAT, "tag": tag, "world_size": bbdist.world_size(), "saved_at": time.time(),
                "files": files, **order}
    atomic.write_text(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True), fsync=True)


def write_latest(ckpt_dir: str, tag: str) -> None:
    atomic.write_text(os.path.join(ckpt_dir, LATEST), tag, fsync=True)


def read_manifest(ckpt_dir: str, tag: str) -> dict:
    path = os.path.join(ckpt_dir, tag)
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{manifest_path}: missing; the save of tag {tag!r} did not finish "
                              "(partial checkpoint)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{manifest_path}: not a {FORMAT} manifest")
    return manifest


def verify_tag(ckpt_dir: str, tag: str, *, hashes: bool = True, pickles: bool | None = None) -> dict:
    """Check a tag: its manifest, every listed file's size, (``hashes``) the content hash of this
    rank's share of the files (all of them on one process), and (``pickles``, default ``hashes``) that
    every torch-saved file unpickles to plain data (:func:`check_pickles`). Returns the manifest;
    raises CheckpointError (:class:`UnsafeCheckpoint`) naming the file."""
    manifest = read_manifest(ckpt_dir, tag)
    path = os.path.join(ckpt_dir, tag)
    rank, world = bbdist.rank(), bbdist.world_size()
    for i, (rel, entry) in enumerate(sorted(manifest["files"].items())):
        fp = os.path.join(path, rel)
        size = entry["bytes"] if isinstance(entry, dict) else entry
        if not os.path.isfile(fp):
            raise CheckpointError(f"{fp}: missing (listed in {MANIFEST}); partial checkpoint")
        actual = os.path.getsize(fp)
        if actual != size:
            raise CheckpointError(f"{fp}: {actual} bytes, manifest says {size}; truncated or modified")
        if hashes and i % world == rank and isinstance(entry, dict) and HASH in entry:
            got = file_hash(fp)
            if got != entry[HASH]:
                raise CheckpointError(f"{fp}: content hash {got} does not match the manifest's {entry[HASH]}; "
                                      "the file was corrupted after it was written")
    if hashes if pickles is None else pickles:
        check_pickles(ckpt_dir, tag, manifest)
    return manifest


def verify_tag_together(ckpt_dir: str, tag: str) -> dict:
    """:func:`verify_tag` on every rank, each hashing its share; every rank raises the first error
    any rank found (collective)."""
    manifest, error = None, None
    try:
        manifest = verify_tag(ckpt_dir, tag, pickles=False)
    except CheckpointError as exc:
        error = str(exc)
    errors = bbdist.agree(error)
    if errors:
        raise CheckpointError(errors[0].split(": ", 1)[1])
    check_pickles(ckpt_dir, tag, manifest)  # the same answer on every rank
    return manifest


def read_latest(ckpt_dir: str) -> str:
    """The tag ``latest`` names; CheckpointError naming the file when it is missing, empty or not a
    tag name."""
    latest = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(latest):
        raise CheckpointError(f"{latest}: missing")
    try:
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{latest}: unreadable ({type(exc).__name__}: {exc})") from None
    if not tag:
        raise CheckpointError(f"{latest}: empty")
    if os.sep in tag or tag in (".", "..") or not tag.isprintable() or len(tag) > 255:
        raise CheckpointError(f"{latest}: {tag[:60]!r} is not a tag name")
    return tag


@dataclass
class TagInfo:
    tag: str
    complete: bool
    order: tuple  # newest last
    why: str = ""  # why it is not complete


def scan(ckpt_dir: str) -> list[TagInfo]:
    """Every tag directory under ``ckpt_dir``, oldest first (by the position its manifest records,
    then its save time; incomplete tags by directory time)."""
    out = []
    names = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    for name in names:
        path = os.path.join(ckpt_dir, name)
        if not os.path.isdir(path) or name.startswith(REFUSED_PREFIX):
            continue
        try:
            m = read_manifest(ckpt_dir, name)
            out.append(TagInfo(name, True, (1, m.get("samples", -1), m.get("saved_at", os.path.getmtime(path)))))
        except CheckpointError as exc:
            out.append(TagInfo(name, False, (0, -1, os.path.getmtime(path)), str(exc)))
    return sorted(out, key=lambda t: t.order)


def good_tags(ckpt_dir: str) -> list[str]:
    """Complete tags whose files are all present with their sizes, newest first (contents are hashed
    when a tag is loaded)."""
    good = []
    for t in reversed(scan(ckpt_dir)):
        if t.complete:
            try:
                verify_tag(ckpt_dir, t.tag, hashes=False)
            except CheckpointError:
                continue
            good.append(t.tag)
    return good


def candidates(ckpt_dir: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Tags to try, best first: the one ``latest`` names (if it is complete), then every other complete
    tag, newest first. Also ``(name, why)`` notes for what was passed over (an unreadable
    ``latest``, a ``latest`` naming an incomplete tag)."""
    complete = [t.tag for t in reversed(scan(ckpt_dir)) if t.complete]
    notes: list[tuple[str, str]] = []
    try:
        hint = read_latest(ckpt_dir)
    except CheckpointError as exc:
        if complete or os.path.exists(os.path.join(ckpt_dir, LATEST)):
            notes.append((LATEST, str(exc)))
        return complete, notes
    if hint in complete:
        return [hint] + [t for t in complete if t != hint], notes
    notes.append((LATEST, f"names {hint!r}, which is not a complete checkpoint"))
    return complete, notes


def retain(ckpt_dir: str, keep: int, newest: str) -> list[str]:
    """Delete tags older than the ``keep`` newest complete ones (``newest`` included), and incomplete
    tags older than ``newest`` (left by saves that failed). Call after ``newest`` is complete; rank 0.
    Returns the deleted tags."""
    tags = scan(ckpt_dir)
    complete = [t for t in tags if t.complete]
    order = {t.tag: t.order for t in tags}
    keep_set = {t.tag for t in complete[-keep:]} | {newest}
    deleted = []
    for t in tags:
        if t.tag in keep_set or (not t.complete and t.order[2] >= order[newest][2]):
            continue
        shutil.rmtree(os.path.join(ckpt_dir, t.tag), ignore_errors=True)
        deleted.append(t.tag)
    return deleted


def tag_bytes(ckpt_dir: str, tag: str) -> int:
    return sum(e["bytes"] if isinstance(e, dict) else e for e in read_manifest(ckpt_dir, tag)["files"].values())


def expected_bytes(ckpt_dir: str) -> int | None:
    """The size of the newest complete tag: what the next save will need, about."""
    for t in reversed(scan(ckpt_dir)):
        if t.complete:
            return tag_bytes(ckpt_dir, t.tag)
    return None


def space_warning(ckpt_dir: str, expected: int | None) -> str | None:
    """A message when the file system of ``ckpt_dir`` has less free space than ``expected`` bytes."""
    if not expected:
        return None
    probe = ckpt_dir
    while not os.path.isdir(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if free >= expected:
        return None
    return (f"{ckpt_dir}: {free / 1e6:,.1f} MB free, a checkpoint needs about {expected / 1e6:,.1f} MB; "
            "the next save will probably fail (no space left on device)")


def describe_write_error(exc: BaseException, path: str) -> str:
    """An OS error as its message with the file; other write failures (torch.save's C++ stream errors
    say only "iostream error") with the file and, when that is the cause, the full disk."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno}) writing {exc.filename or path}"
    probe = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        free = None
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if free is not None and free < (1 << 20):
        reason = f"no space left on device ({free} bytes free; {reason})"
    return f"{reason} writing {path}"


class TagSave:
    """One collective, all-or-nothing save of ``ckpt_dir/tag``, whatever writes its files.

    Every rank calls the methods in the same order; each step that can fail on some rank ends with
    :meth:`check`, so all ranks go on or all raise :class:`CheckpointSaveError` (the new tag's files
    removed, the message naming the rank, the file and the error, ``latest`` and the earlier tags
    untouched). :meth:`finish` hashes the files (the ranks share the work), writes the manifest and
    ``latest``, and applies the retention. ``group``: the process group of its collectives (a
    save that completes in a background thread needs one of its own; default: every rank).
    """

    def __init__(self, ckpt_dir: str, tag: str, group=None):
        if os.sep in tag or tag in ("", ".", "..", LATEST):
            raise ValueError(f"tag={tag!r}: must be a plain directory name")
        self.ckpt_dir, self.tag, self.group = ckpt_dir, tag, group
        self.path = os.path.join(ckpt_dir, tag)
        error = None
        if bbdist.rank() == 0:
            try:
                os.makedirs(self.path, exist_ok=True)
                # re-saving a tag: drop its manifest first so a crash mid-save leaves it refused
                if os.path.exists(os.path.join(self.path, MANIFEST)):
                    os.remove(os.path.join(self.path, MANIFEST))
            except OSError as exc:
                error = describe_write_error(exc, self.path)
        self.check(error)

    def check(self, error: str | None) -> None:
        """After a step that may have failed on this rank (``error``): collective."""
        if errors := bbdist.agree(error, self.group):
            raise self.failed(errors)

    def failed(self, errors: list[str]) -> CheckpointSaveError:
        if bbdist.rank() == 0:
            shutil.rmtree(self.path, ignore_errors=True)
        try:
            latest = read_latest(self.ckpt_dir)
        except CheckpointError:
            latest = None
        kept = f"'latest' still names {latest!r}" if latest else "no earlier checkpoint"
        return CheckpointSaveError(f"checkpoint {self.tag!r} in {self.ckpt_dir!r} was not saved: " + "; ".join(errors)
                                   + f". Its files were removed; {kept}.")

    def write(self, files: list[tuple[str, object]]) -> None:
        """``torch.save`` each ``(file name in the tag, object)`` atomically, then :meth:`check`."""
        error = None
        for name, obj in files:
            file = os.path.join(self.path, name)
            try:
                atomic.torch_save(obj, file)
            except Exception as exc:
                error = describe_write_error(exc, file)
                break
        self.check(error)

    def finish(self, *, keep: int | None = None, **order) -> str:
        """Hash, write the manifest (with ``order``, e.g. ``samples=``) and ``latest``; keep the ``keep``
        newest complete tags. Returns the tag's path."""
        hashes = hash_share(self.path, tag_files(self.path), self.group)
        error, deleted = None, []
        if bbdist.rank() == 0:
            try:
                write_manifest(self.ckpt_dir, self.tag, hashes, **order)
                write_latest(self.ckpt_dir, self.tag)
            except OSError as exc:
                error = describe_write_error(exc, os.path.join(self.path, MANIFEST))
            if error is None and keep:
                deleted = retain(self.ckpt_dir, keep, self.tag)
        self.check(error)
        if deleted:
            logger.info("bigbatch: kept the %d newest checkpoints; deleted %s", keep, deleted)
        return self.path


def set_aside(ckpt_dir: str, tag: str) -> str:
    """Rename the refused ``tag`` to ``refused-<tag>`` (``-2``, ``-3``, ... if taken); returns the name."""
    name, n = REFUSED_PREFIX + tag, 1
    while os.path.exists(os.path.join(ckpt_dir, name)):
        n += 1
        name = f"{REFUSED_PREFIX}{tag}-{n}"
    os.replace(os.path.join(ckpt_dir, tag), os.path.join(ckpt_dir, name))
    return name


def load_first_good(ckpt_dir: str, tag: str | None, fallback: bool, load):
    """``load(tag)`` of the first good tag: ``tag``, else the one ``latest`` names; with ``fallback``
    the other complete tags, newest first, when that one is refused (an unreadable ``latest`` is
    passed over too). Each is verified first (sizes and hashes, the ranks sharing the work). Says
    the tag used (rank 0, when ``tag`` is None) and logs what was passed over; raises CheckpointError naming the file (without
    ``fallback``), or :class:`NoUsableCheckpoint` listing every refused tag and why."""
    if tag is not None:
        order, notes = [tag], []
    elif fallback:
        order, notes = candidates(ckpt_dir)
    else:
        order, notes = [read_latest(ckpt_dir)], []
    refused = list(notes)
    for candidate in order:
        try:
            verify_tag_together(ckpt_dir, candidate)
            result = load(candidate)
        except UnsafeCheckpoint:
            raise  # a file planted to run code is not a damaged tag to pass over
        except CheckpointError as exc:
            if not fallback:
                raise
            refused.append((candidate, str(exc)))
            continue
        if refused and bbdist.rank() == 0:
            moved = [set_aside(ckpt_dir, t) for t, _ in refused if t in order]
            logger.warning("bigbatch: loaded checkpoint %r; passed over: %s%s", candidate,
                           "; ".join(f"{t}: {why}" for t, why in refused),
                           f" (set aside as {', '.join(moved)})" if moved else "")
        elif tag is None and bbdist.rank() == 0:  # the caller chose none: say which one this is
            print(f"bigbatch: loaded checkpoint {candidate!r} from {ckpt_dir}", flush=True)
        return result
    raise NoUsableCheckpoint(ckpt_dir, refused)

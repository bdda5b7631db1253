"""SLURM host lists: ``gpu[01-03,07],cpu5`` -> ``["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]``.

Grammar, as ``scontrol show hostnames`` (SLURM 22.05) reads it:

* A list is items separated by commas or whitespace (empty items are ignored).
* An item is text with zero or more bracket groups, ``rack[1-2]-node[01-02]``; several groups
  expand as a cartesian product in SLURM's own order (``a[1-2]b[3-4]`` -> a1b3 a1b4 a2b3 a2b4;
  for three or more groups see :func:`_expand_item`).
* A group holds comma-separated ranges ``lo-hi`` or single numbers ``n``. The low bound's digit
  count is the zero-padded width of the whole range (``[098-101]`` -> 098 099 100 101,
  ``[01-3]`` -> 01 02 03, ``[1-03]`` -> 1 2 3). ``lo > hi`` is an error.

Differences, on purpose: text after the last group (``x[1-3]y``) is accepted here, though
SLURM 22.05 rejects it (SLURM never writes such lists itself; newer tools do). The few inputs that
22.05 reads oddly rather than rejecting (``n[1-2`` -> ``n]``, ``n[3-]`` -> ``n3``, blanks inside
brackets) are errors here.
"""

from __future__ import annotations

import re

__all__ = ["HostlistError", "expand_hostlist"]

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
# One host has at most this many names after expansion: a guard against typos like [1-99999999].
MAX_HOSTS = 1_000_000


class HostlistError(ValueError):
    """A malformed SLURM host list; the message quotes the list and the bad part."""


def _split_items(hostlist: str) -> list[str]:
    """Split on commas and whitespace that are outside brackets."""
    items, depth, cur = [], 0, []
    for ch in hostlist:
        if ch == "[":
            if depth:
                raise HostlistError(f"host list {hostlist!r}: nested '[' is not allowed")
            depth = 1
        elif ch == "]":
            if not depth:
                raise HostlistError(f"host list {hostlist!r}: ']' without a matching '['")
            depth = 0
        elif depth == 0 and (ch == "," or ch.isspace()):
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    if depth:
        raise HostlistError(f"host list {hostlist!r}: '[' is not closed")
    items.append("".join(cur))
    return [item for item in items if item]


def _expand_group(hostlist: str, body: str) -> list[str]:
    """``01-03,07`` -> ["01", "02", "03", "07"]."""
    out: list[str] = []
    for part in body.split(","):
        m = _RANGE.fullmatch(part)
        if m is None:
            raise HostlistError(
                f"host list {hostlist!r}: bad range {part!r} in [{body}]; "
                "expected N or LO-HI with decimal digits, e.g. [01-03,07]"
            )
        lo_s, hi_s = m.group(1), m.group(2)
        lo, hi = int(lo_s), int(hi_s if hi_s is not None else lo_s)
        if lo > hi:
            raise HostlistError(f"host list {hostlist!r}: range {part!r} has low > high")
        if hi - lo + 1 > MAX_HOSTS:
            raise HostlistError(f"host list {hostlist!r}: range {part!r} has more than {MAX_HOSTS} hosts")
        width = len(lo_s)
        out.extend(str(n).zfill(width) for n in range(lo, hi + 1))
    return out


def _expand_item(hostlist: str, item: str) -> list[str]:
    """One item, in SLURM's order: the last group is split off; with nothing after it, it
    varies fastest (``a[1-2]b[3-4]`` -> a1b3 a1b4 a2b3 a2b4); with text after it (always the
    case for a middle group), it varies slowest. With three groups that makes the middle one
    outermost: ``a[1-2]b[1-2]c[1-2]`` -> a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 ... as scontrol prints."""
    close = item.rfind("]")
    if close < 0:
        return [item]
    open_ = item.rfind("[", 0, close)
    prefix, body, suffix = item[:open_], item[open_ + 1:close], item[close + 1:]
    values = _expand_group(hostlist, body)
    if suffix:
        return [host for v in values for host in _expand_item(hostlist, prefix + v + suffix)]
    return [p + v for p in _expand_item(hostlist, prefix) for v in values]


def _count_item(hostlist: str, item: str) -> int:
    count = 1
    for body in re.findall(r"\[([^\]]*)\]", item):
        count *= len(_expand_group(hostlist, body))
    return count


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a SLURM host list into host names, in SLURM's order (duplicates kept)."""
    if not isinstance(hostlist, str):
        raise HostlistError(f"host list: expected a string, got {type(hostlist).__name__}")
    hosts: list[str] = []
    for item in _split_items(hostlist):
        if len(hosts) + _count_item(hostlist, item) > MAX_HOSTS:
            raise HostlistError(f"host list {hostlist!r}: expands to more than {MAX_HOSTS} hosts")
        hosts.extend(_expand_item(hostlist, item))
    return hosts

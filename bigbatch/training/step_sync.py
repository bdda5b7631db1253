"""Values the loop keeps on the device between two sync points, brought to the host with one collective
and one read.

A training step reads nothing: each metric of a step (a loss, a gradient norm, a count, a flag a rank
raised) is added to a :class:`StepSync` as a scalar tensor (or a host number) under a name and a
reduction. At a sync point (a log step, a decision, a signal check) every rank packs what it holds
into one float64 vector in the same order, the vectors are all-gathered in one collective and read
once, and each name is reduced over the steps and the ranks on the host:

* ``mean``: sum of ``value x weight`` over steps and ranks / sum of ``weight``;
* ``ratio``: sum of ``value`` over steps and ranks / sum of ``weight`` (a share of counts);
* ``sum``, ``max``, ``min``: over steps and ranks;
* ``last``: the last step's value, averaged over the ranks;
* ``each``: a list, one value per recorded step, averaged over the ranks;
* ``each_same``: a list, one value per recorded step, rank 0's (values every rank holds alike).

Every rank must record the same names the same number of times (they run the same code).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

REDUCES = ("mean", "ratio", "sum", "max", "min", "last", "each", "each_same")


@dataclass
class _Entry:
    reduce: str
    log: bool
    value: object = None  # tensor or float; a list for each / each_same
    weight: float = 0.0  # host sum of weights (mean)
    items: list = field(default_factory=list)


class StepSync:
    """The named values of the steps since the last sync (see the module docstring); ``device``: where
    the collective's vector lives (the model's device; CPU under gloo)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.entries: dict[str, _Entry] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def add(self, name: str, value, reduce: str = "mean", *, weight: float = 1.0, log: bool = True) -> None:
        """Add a step's ``value`` (scalar tensor or number) under ``name``; ``log``: the value belongs in
        the next train record (else it is only read by the callback that added it)."""
        if reduce not in REDUCES:
            raise ValueError(f"reduce: {reduce!r} is not one of {list(REDUCES)}")
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = _Entry(reduce, log)
        elif entry.reduce != reduce:
            raise ValueError(f"{name}: added with reduce {entry.reduce!r} before, now {reduce!r}")
        if isinstance(value, torch.Tensor):
            value = value.detach()
        if reduce in ("each", "each_same"):
            entry.items.append(value)
        elif reduce in ("mean", "ratio"):
            value = value * weight if reduce == "mean" and weight != 1.0 else value
            entry.value = value if entry.value is None else entry.value + value
            entry.weight += weight
        elif reduce == "sum":
            entry.value = value if entry.value is None else entry.value + value
        elif reduce in ("max", "min"):
            if entry.value is None:
                entry.value = value
            else:
                pick = torch.maximum if reduce == "max" else torch.minimum
                entry.value = pick(torch.as_tensor(entry.value), torch.as_tensor(value))
        else:  # last
            entry.value = value

    def collect(self, *, logged: bool = True, group=None) -> tuple[dict, dict]:
        """Reduce the names over the steps and the ranks of ``group`` (collective: one all-gather and
        one read) and drop them from the buffer; without ``logged``, the names added with ``log`` stay
        buffered for the next train record. Returns ``({name: float or list of floats}, {the names
        added with log: their values})``."""
        taken = {k: e for k, e in self.entries.items() if logged or not e.log}
        parts = []
        for entry in taken.values():
            parts += _slots(entry)
        values = [torch.as_tensor(p, dtype=torch.float64).reshape(()) for p in parts]
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if values:
            vec = torch.stack([v.to(self.device) for v in values])
            if world > 1:
                out = [torch.empty_like(vec) for _ in range(world)]
                dist.all_gather(out, vec, group=group)
                rows = torch.stack(out).tolist()
            else:
                rows = [vec.tolist()]
        else:
            rows = [[] for _ in range(world)]
        result, record, at = {}, {}, 0
        for name, entry in taken.items():
            n = len(_slots(entry))
            cols = [row[at:at + n] for row in rows]
            at += n
            result[name] = _reduce(entry, cols, world)
            if entry.log:
                record[name] = result[name]
            del self.entries[name]
        return result, record



def _slots(entry: _Entry) -> list:
    """What one name puts in the gathered vector."""
    if entry.reduce in ("each", "each_same"):
        return entry.items
    if entry.reduce in ("mean", "ratio"):
        return [entry.value, entry.weight]  # each rank's weight: the ranks' may differ
    return [entry.value]


def _reduce(entry: _Entry, cols: list[list[float]], world: int):
    """One name's value from each rank's slice ``cols[rank]``."""
    if entry.reduce == "each":
        return [sum(col[i] for col in cols) / world for i in range(len(cols[0]))]
    if entry.reduce == "each_same":
        return list(cols[0])
    per_rank = [col[0] for col in cols]
    if entry.reduce in ("mean", "ratio"):
        weight = sum(col[1] for col in cols)
        return sum(per_rank) / weight if weight else float("nan")
    if entry.reduce == "sum":
        return sum(per_rank)
    if entry.reduce == "max":
        return max(per_rank)
    if entry.reduce == "min":
        return min(per_rank)
    return sum(per_rank) / world  # last

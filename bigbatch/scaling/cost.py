"""Cost model of a pretraining run along its batch schedule: wall time, node-hours and tokens of (a) a fixed
small allocation, (b) a fixed large one and (c) a run that moves to more nodes as its batch grows
(the ``scale_out`` policy). Batches and tokens are in tokens throughout.

The batch follows a schedule (by default the automatic one: from ``start``, multiplied by ``factor``
whenever the noise scale ``B_noise`` is at least ``margin`` x the next batch). Reaching a loss takes
E = E_min (1 + B/B_noise) tokens at batch B (McCandlish et al. 2018), so a run forced to a batch B' > B
(the large allocation's smallest batch) needs (1 + B'/B_noise) / (1 + B/B_noise) times the tokens of the
schedule run over the same stretch of training.

* (a) ``small`` nodes throughout: the schedule's batch by accumulation.
* (b) ``max_nodes`` throughout: the batch is at least what those nodes run without accumulation,
  paying the extra tokens wherever that is above the schedule's batch.
* (c) scale-out: at each point the fewest nodes (from ``small``) that take the schedule's batch
  within ``max_grad_accum``; every move costs ``restart_s`` of wall time on the new allocation.

On paper (:func:`paper_cluster`): a GPU's dense bf16 FLOP/s at an MFU, 6 N FLOPs per token, a ring
all-reduce of the gradients between nodes partly hidden behind the backward pass, and the critical
batch along training from published scaling laws (:func:`critical_batch_curve`); ``PAPER_ASSUMPTIONS``
says each number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

STRATEGIES = {"a": "fixed small", "b": "fixed large", "c": "scale-out"}

#: the defaults of :func:`paper_cluster`, said once wherever its numbers are shown
MFU = 0.4
NODE_BANDWIDTH = 400e9  # bytes/s between nodes: 8 x 400 Gb/s InfiniBand
ALLREDUCE_OVERLAP = 0.5
RESTART_S = 600.0
PAPER_ASSUMPTIONS = (
    "{mfu:.0%} MFU of the GPU's dense bf16 FLOP/s (6 N FLOPs/token); {bw:g} GB/s between nodes, ring all-reduce "
    "of the gradients, half of it hidden behind the backward pass; restart (checkpoint, the new job's start-up, "
    "load) {restart:g} min, queue wait not counted; critical batch B_crit(L) = 2.1e8 / L^(1/0.21) tokens "
    "(Kaplan et al. 2020) along L(D) = 1.69 + 406.4/N^0.34 + 410.7/D^0.28 (Hoffmann et al. 2022)")


def assumptions(mfu: float = MFU, node_bandwidth: float = NODE_BANDWIDTH, restart_s: float = RESTART_S) -> str:
    return PAPER_ASSUMPTIONS.format(mfu=mfu, bw=node_bandwidth / 1e9, restart=restart_s / 60)


@dataclass
class Cluster:
    """What a run of one model costs on ``n`` nodes. Batches and tokens are in tokens.

    ``step_seconds(batch, n)``: one optimizer step; ``min_batch_node``: the batch one node runs
    without accumulation (its devices x their micro batch)."""

    name: str
    min_batch_node: float
    max_grad_accum: int
    small: int
    max_nodes: int
    restart_s: float
    tokens: float
    tokens_per_s: dict | None = None  # measured: nodes -> tokens/s (any batch)
    gpu_tokens_per_s: float = 0.0  # on paper: per GPU
    gpus_per_node: int = 8
    grad_bytes: float = 0.0
    node_bandwidth: float = 0.0  # bytes/s between nodes
    overlap: float = ALLREDUCE_OVERLAP  # share of the all-reduce hidden behind the backward pass

    def step_seconds(self, batch: float, n: int) -> float:
        if self.tokens_per_s is not None:
            return batch / self.tokens_per_s[n]
        compute = batch / (n * self.gpus_per_node * self.gpu_tokens_per_s)
        allreduce = 2 * (n - 1) / n * self.grad_bytes / self.node_bandwidth if n > 1 else 0.0
        return compute + (1 - self.overlap) * allreduce

    def tokens_per_second(self, batch: float, n: int) -> float:
        return batch / self.step_seconds(batch, n)

    def nodes_for(self, batch: float) -> int:
        """The fewest nodes (from ``small``) that take ``batch`` within ``max_grad_accum``."""
        need = math.ceil(batch / (self.min_batch_node * self.max_grad_accum) - 1e-9)
        return min(self.max_nodes, max(self.small, need))


def schedule_batch(b_noise: float, start: float, maximum: float, factor: float = 2, margin: float = 1.0) -> float:
    """The automatic schedule's batch at a noise scale: from ``start``, x ``factor`` while
    B_noise >= ``margin`` x the next batch, up to ``maximum``."""
    batch = start
    while batch * factor <= maximum and b_noise >= margin * batch * factor:
        batch *= factor
    return batch


def costs(c: Cluster, b_noise: Callable[[float], float], points: int = 2000,
          batch_at: Callable[[float, float], float] | None = None) -> dict:
    """{strategy: wall_s, node_s, tokens, moves} of (a), (b), (c) over ``c.tokens`` of the schedule run;
    ``b_noise(tokens)`` in tokens; ``batch_at(tokens, b_noise)``: the schedule's batch in tokens (default:
    the automatic schedule from ``c.small``'s batch to ``c.max_nodes``' within ``c.max_grad_accum``)."""
    start, maximum = c.min_batch_node * c.small, c.min_batch_node * c.max_nodes * c.max_grad_accum
    if batch_at is None:
        def batch_at(_tokens, bn):
            return schedule_batch(bn, start, maximum)
    out = {k: {"wall_s": 0.0, "node_s": 0.0, "tokens": 0.0, "moves": 0} for k in STRATEGIES}
    nodes_now = c.small
    dt = c.tokens / points
    for i in range(points):
        t = (i + 0.5) * dt
        bn = b_noise(t)
        batch = batch_at(t, bn)
        for key, n in (("a", c.small), ("b", c.max_nodes), ("c", c.nodes_for(batch))):
            run_batch = max(batch, n * c.min_batch_node)
            tokens = dt * (1 + run_batch / bn) / (1 + batch / bn)
            seconds = tokens / run_batch * c.step_seconds(run_batch, n)
            if key == "c" and n != nodes_now:
                out["c"]["moves"] += 1
                seconds += c.restart_s
                nodes_now = n
            out[key]["wall_s"] += seconds
            out[key]["node_s"] += seconds * n
            out[key]["tokens"] += tokens
    return out


def critical_batch_curve(params: float) -> Callable[[float], float]:
    """B_noise(tokens seen) in tokens for a model of ``params`` parameters, on paper: the loss after D
    tokens by Hoffmann et al. 2022 (their fit, at D >= 1M), and the critical batch at that loss by Kaplan et
    al. 2020 (B_crit = 2.1e8 tokens / L^(1/0.21))."""

    def b_noise(tokens: float) -> float:
        loss = 1.69 + 406.4 / params ** 0.34 + 410.7 / max(tokens, 1e6) ** 0.28
        return 2.1e8 / loss ** (1 / 0.21)

    return b_noise


def paper_cluster(name: str, *, params: float, tokens: float, micro_batch: int, seq_len: int, gpus_per_node: int,
                  small: int, max_nodes: int, gpu_flops: float, grad_bytes_per_param: float = 2.0,
                  max_grad_accum: int = 1, mfu: float = MFU, restart_s: float = RESTART_S,
                  node_bandwidth: float = NODE_BANDWIDTH) -> Cluster:
    """A :class:`Cluster` on paper: ``gpu_flops`` dense FLOP/s per GPU at ``mfu``, 6 N FLOPs per token,
    ``grad_bytes_per_param`` bytes of gradient all-reduced per step (2: bf16)."""
    tpg = mfu * gpu_flops / (6 * params)
    return Cluster(name, min_batch_node=gpus_per_node * micro_batch * seq_len, max_grad_accum=max_grad_accum,
                   small=small, max_nodes=max_nodes, restart_s=restart_s, tokens=tokens, gpu_tokens_per_s=tpg,
                   gpus_per_node=gpus_per_node, grad_bytes=grad_bytes_per_param * params,
                   node_bandwidth=node_bandwidth)


def batch_trajectory(batch_at: Callable[[float, float], float], b_noise: Callable[[float], float], tokens: float,
                     points: int = 2000) -> list[tuple[float, float]]:
    """[(tokens, batch)] at every change of the schedule's batch over ``tokens`` (the first at 0)."""
    out: list[tuple[float, float]] = []
    for i in range(points + 1):
        t = tokens * i / points
        b = batch_at(t, b_noise(t))
        if not out or b != out[-1][1]:
            out.append((t, b))
    return out

"""Scale-out: leave for more nodes when the batch schedule outgrows the nodes in hand.

Accumulating micro batches grows the global batch on a fixed allocation at a fixed rate of tokens
per second; once the batch needs more than ``scale_out.max_grad_accum`` micro batches per device,
more devices would run the same steps in less time, and below the critical batch (the noise scale
``B_noise``) the extra devices cost no extra tokens. The run then saves a checkpoint, logs a
``scale_out`` record and exits with :data:`bigbatch.exit_codes.SCALE_OUT`; the sbatch script of
``bigbatch submit --max-nodes M`` submits the same command on the node count named in
``$BIGBATCH_SCALE_OUT_FILE`` and ``--resume`` continues the same sample stream there.

Resumed on fewer nodes than its checkpoint's (a node lost, the job requeued smaller), the run stays
on what it got: the batch in force is cut to the largest schedule batch within ``max_grad_accum``
there (the scaling rules applied downwards by the resume), the schedule grows only as far as those
nodes take, without a scale-out in this job; a ``nodes_change`` record says what moved.
"""

from __future__ import annotations

import os

from bigbatch import atomic, exit_codes
from bigbatch import distributed as bbdist
from bigbatch.training.builders import make_plan
from bigbatch.training.callbacks.base import Callback
from bigbatch.training.config import ConfigError, RunConfig

#: the largest node count the launcher allows (``bigbatch submit --max-nodes``); caps the config's
MAX_NODES_ENV = "BIGBATCH_MAX_NODES"
#: where rank 0 writes the node count to move to (set by the sbatch script)
TARGET_FILE_ENV = "BIGBATCH_SCALE_OUT_FILE"


def allowed_max_nodes(cfg: RunConfig, environ=os.environ) -> int:
    """``scale_out.max_nodes`` capped by the launcher's ``$BIGBATCH_MAX_NODES`` (0: the policy is off)."""
    limit = cfg.scale_out.max_nodes
    env = environ.get(MAX_NODES_ENV, "").strip()
    if limit and env.isdigit():
        limit = min(limit, int(env))
    return limit


def _plan(cfg: RunConfig, world_size: int, global_batch: int):
    """The plan of ``global_batch`` on ``world_size`` devices, None where it cannot be formed."""
    try:
        return make_plan(cfg, world_size, global_batch)
    except ConfigError:
        return None


def layout_accum(cfg: RunConfig, world_size: int, global_batch: int) -> int | None:
    """The micro batches per device that ``global_batch`` needs on ``world_size`` devices, not counting
    the accumulation that only measuring the noise scale asks for (None: it cannot be formed)."""
    try:
        return make_plan(cfg, world_size, global_batch, noise=False).grad_accum
    except ConfigError:
        return None


def fitting_plan(cfg: RunConfig, global_batch: int, nodes: int, per_node: int):
    """The plan of ``global_batch`` on ``nodes`` x ``per_node`` devices if the batch needs at most
    ``scale_out.max_grad_accum`` micro batches per device there, else None."""
    accum = layout_accum(cfg, nodes * per_node, global_batch)
    if accum is None or accum > cfg.scale_out.max_grad_accum:
        return None
    return _plan(cfg, nodes * per_node, global_batch)


def target_nodes(cfg: RunConfig, global_batch: int, nodes: int, per_node: int, max_nodes: int) -> int | None:
    """The fewest nodes above ``nodes`` (up to ``max_nodes``) on which ``global_batch`` fits."""
    return next((n for n in range(nodes + 1, max_nodes + 1) if fitting_plan(cfg, global_batch, n, per_node)), None)


def largest_fitting(cfg: RunConfig, batches: list[int], nodes: int, per_node: int, at_most: int) -> int | None:
    """The largest of ``batches`` up to ``at_most`` that fits on ``nodes`` (None: none does)."""
    fits = [b for b in batches if b <= at_most and fitting_plan(cfg, b, nodes, per_node)]
    return max(fits) if fits else None


def check_scale_out(cfg: RunConfig, world_size: int, per_node: int, *, fresh: bool, environ=os.environ) -> int | None:
    """Every batch the schedule can put in force must fit within ``max_grad_accum`` on some allowed
    node count (1 .. max_nodes x ``per_node`` devices), and a ``fresh`` run (not a resume) must start
    at the schedule's first batch here: refused before any work otherwise. Returns the global batch
    to build the engine at on ``world_size`` devices (the first of the schedule formable here; a
    resume moves it to the checkpoint's), or None without the policy."""
    max_nodes = allowed_max_nodes(cfg, environ)
    if not max_nodes:
        return None
    schedule = cfg.batch.batch_schedule()
    for batch in schedule.batches():
        if not any(fitting_plan(cfg, batch, n, per_node) for n in range(1, max_nodes + 1)):
            s, b = cfg.scale_out, cfg.batch
            raise ConfigError(
                f"scale_out.max_grad_accum: {s.max_grad_accum} micro batches of batch.micro_batch_sizes "
                f"{list(b.micro_batch_sizes)} per device cannot form the schedule's global batch {batch} on any "
                f"of 1..{max_nodes} nodes x {per_node} devices; raise scale_out.max_grad_accum or "
                f"scale_out.max_nodes, or change batch.micro_batch_sizes or batch.schedule")
    if fresh:
        make_plan(cfg, world_size, schedule.start, where=f"batch.schedule: the first batch {schedule.start} on "
                                                         f"{world_size} devices")
        return schedule.start
    here = next((b for b in schedule.batches() if _plan(cfg, world_size, b) is not None), None)
    if here is None:
        raise ConfigError(f"batch.schedule: none of its global batches {schedule.batches()} can be formed on "
                          f"{world_size} devices with batch.micro_batch_sizes {list(cfg.batch.micro_batch_sizes)}")
    return here


class ScaleOut(Callback):
    """The ``scale_out`` policy of ``cfg`` (see the module docstring); after the batch schedule's
    callback, so it sees the batch the schedule just put in force. ``exit_code``: the code the
    launcher resubmits on."""

    state_key = "scale_out"
    priority = 90

    def __init__(self, cfg: RunConfig, exit_code: int = exit_codes.SCALE_OUT, environ=os.environ):
        self.cfg, self.exit_code = cfg, exit_code
        self.max_nodes = allowed_max_nodes(cfg, environ)
        self.target_file = environ.get(TARGET_FILE_ENV)
        self.saved_nodes: int | None = None
        self.saved_move: int | None = None  # the node count a scale-out checkpoint was saved for
        self.nodes: int | None = None
        self.moving_to: int | None = None
        self.waiting = False  # told the user once that the noise scale holds the move back

    @staticmethod
    def _layout(trainer) -> tuple[int, int]:
        """(nodes, devices per node) of this process group."""
        per_node = max(1, trainer.info.local_world_size)
        return max(1, trainer.info.world_size // per_node), per_node

    def resume_batch(self, trainer, saved: int, planned: int) -> int:
        nodes, per_node = self._layout(trainer)
        if self.saved_nodes is None or nodes >= self.saved_nodes:
            return planned
        batches = self.cfg.batch.batch_schedule().batches()
        limit = largest_fitting(self.cfg, batches, nodes, per_node, max(batches))
        if limit is None:  # nothing fits the limit here: keep the batch, with more accumulation
            return planned
        trainer.limit_batch(limit)
        return min(planned, limit)

    def on_restore(self, trainer) -> None:
        start = self.cfg.batch.batch_schedule().start
        if trainer.step == 0 and trainer.plan.global_batch != start:  # --resume found no checkpoint
            raise ConfigError(f"batch.schedule: the first batch {start} cannot be formed on {trainer.info.world_size} "
                              f"devices; start the run on a node count that takes it")
        self.nodes, per_node = self._layout(trainer)
        before = self.saved_nodes
        if before is None or before == self.nodes:
            return
        reason = "nodes_lost" if self.nodes < before else "scale_out" if self.saved_move else "nodes_added"
        plan = trainer.plan
        trainer.log({"kind": "nodes_change", "reason": reason, "step": trainer.step,
                     "samples": trainer.loader.samples_seen, "tokens": trainer.tokens, "nodes_from": before,
                     "nodes": self.nodes, "world_size": trainer.info.world_size,
                     "global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
                     "grad_accum": plan.grad_accum, "batch_limit": trainer.batch_limit,
                     "noise_scale": trainer.noise.b_noise})
        rest = (f"; the batch stays at most {trainer.batch_limit} on these nodes" if trainer.batch_limit else "")
        trainer.say(f"--resume: nodes {before} -> {self.nodes} ({reason.replace('_', ' ')}) at step {trainer.step}: "
                    f"global batch {plan.global_batch} = {plan.micro_batch} x {plan.grad_accum} accum x "
                    f"{trainer.info.world_size}{rest}")

    def _outgrown(self, trainer) -> bool:
        """The batch in force needs more accumulation here than the policy allows (the noise scale's own
        accumulation aside)."""
        if trainer.batch_limit is not None or trainer.done() or trainer.plan.grad_accum <= self.cfg.scale_out.max_grad_accum:
            return False
        accum = layout_accum(self.cfg, trainer.info.world_size, trainer.plan.global_batch)
        return accum is None or accum > self.cfg.scale_out.max_grad_accum

    def wants_sync(self, trainer) -> bool:
        return self._outgrown(trainer) and trainer.step % self.cfg.batch.decide_every == 0

    def on_sync(self, trainer, values: dict) -> None:
        if not self._outgrown(trainer):
            return
        plan = trainer.plan
        nodes, per_node = self._layout(trainer)
        target = target_nodes(self.cfg, plan.global_batch, nodes, per_node, self.max_nodes)
        if target is None:
            return
        noise, margin = trainer.noise.b_noise, self.cfg.scale_out.margin(self.cfg.batch)
        if margin and (noise is None or noise < margin * plan.global_batch):
            if not self.waiting:
                self.waiting = True
                trainer.say(f"scale-out waits at step {trainer.step}: global batch {plan.global_batch} needs "
                            f"{plan.grad_accum} accum here, {target} nodes would take it, but B_noise "
                            f"{'is not measured' if noise is None else f'{noise:.1f}'} < scale_out.noise_margin "
                            f"{margin:g} x {plan.global_batch}")
            return
        self.moving_to = target
        trainer.save_checkpoint("scale_out")
        trainer.log({"kind": "scale_out", "step": trainer.step, "samples": trainer.loader.samples_seen,
                     "tokens": trainer.tokens, "nodes_from": nodes, "nodes_to": target,
                     "global_batch": plan.global_batch, "grad_accum": plan.grad_accum,
                     "max_grad_accum": self.cfg.scale_out.max_grad_accum, "noise_scale": noise})
        if trainer.info.is_main and self.target_file:
            atomic.write_text(self.target_file, f"{target}\n")
        bbdist.barrier()  # the target file exists before any rank exits
        trainer.say(f"scale-out at step {trainer.step} ({trainer.tokens:,} tokens): global batch "
                    f"{plan.global_batch} needs {plan.grad_accum} accum on {nodes} node(s) (limit "
                    f"{self.cfg.scale_out.max_grad_accum}), B_noise "
                    f"{'not asked' if noise is None else f'{noise:.1f}'}; checkpoint saved, exiting with code "
                    f"{self.exit_code} to continue on {target} nodes")
        trainer.request_stop(self.exit_code)

    def state_dict(self) -> dict:
        return {"nodes": self.nodes, "moving_to": self.moving_to}

    def load_state_dict(self, state: dict) -> None:
        self.saved_nodes, self.saved_move = state.get("nodes"), state.get("moving_to")

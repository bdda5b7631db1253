"""The engines a run trains on, by the name ``train.engine`` gives them. Each entry owns its builder
(run config, model, batch plan -> :class:`~bigbatch.sharding.training_engine.TrainingEngine`) and its
checks of a run config at a world size; its checkpoints say themselves how they are read
(:func:`bigbatch.sharding.full_state.read_full_state`), so every engine resumes every other's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from bigbatch.sharding import ddp_engine, deepspeed_engine, fsdp2_engine


@dataclass(frozen=True)
class EngineEntry:
    """``build(cfg, model, plan)`` makes the engine; ``check(cfg, world_size)`` raises a ConfigError for
    a run config it cannot train at that world size (before any work)."""

    build: Callable
    check: Callable = lambda cfg, world_size: None


ENGINES: dict[str, EngineEntry] = {
    "deepspeed": EngineEntry(deepspeed_engine.build),
    "fsdp2": EngineEntry(fsdp2_engine.build, fsdp2_engine.check),
    "ddp": EngineEntry(ddp_engine.build),
}

"""The engines a run trains on, by the name ``train.engine`` gives them. Each entry owns its builder
(run config, model, batch plan -> :class:`~bigbatch.sharding.training_engine.TrainingEngine`) and its
checks of a run config at a world size; its checkpoints say themselves how they are read
(:func:`bigbatch.sharding.full_state.read_full_state`), so every engine resumes every other's."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class EngineEntry:
    """The engine's module, imported when the run uses it (a DeepSpeed run then does not import
    torch.distributed.checkpoint, nor a command that never builds an engine). The module has ``build(cfg, model,
    plan)``, which makes the engine, and may have ``check(cfg, world_size)``, which raises a ConfigError
    for a run config it cannot train at that world size (before any work)."""

    module: str

    def _module(self) -> ModuleType:
        return importlib.import_module(self.module)

    def build(self, cfg, model, plan):
        return self._module().build(cfg, model, plan)

    def check(self, cfg, world_size: int) -> None:
        check = getattr(self._module(), "check", None)
        if check is not None:
            check(cfg, world_size)


ENGINES: dict[str, EngineEntry] = {
    "deepspeed": EngineEntry("bigbatch.sharding.deepspeed_engine"),
    "fsdp2": EngineEntry("bigbatch.sharding.fsdp2_engine"),
    "ddp": EngineEntry("bigbatch.sharding.ddp_engine"),
}

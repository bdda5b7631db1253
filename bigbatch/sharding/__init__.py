"""Engines that shard a model and bigbatch's optimizer, behind one interface
(:class:`~bigbatch.sharding.training_engine.TrainingEngine`), and checkpoints that reshard.

* DeepSpeed ZeRO 0-3: ``build_engine(model, ds_config, *, plan=None, param_groups=None,
  lr_scheduler=None)`` returns ``(engine, optimizer, lr_scheduler)`` (:mod:`.deepspeed_engine`;
  config resolution in :mod:`.deepspeed_config`); ``save_checkpoint`` / ``load_checkpoint``
  (:mod:`.deepspeed_checkpoint`) save atomically (all or nothing, content-hashed) and resume on any
  world size and ZeRO stage, rescaling hyperparameters when the global batch changes.
* FSDP2: :mod:`.fsdp2_engine` (``fully_shard``) and :mod:`.fsdp2_checkpoint` (DCP).
* :mod:`.full_state`: ``read_full_state(ckpt_dir, tag)``: either engine's tag by parameter name, in one
  process (what each engine resumes the other's tags from).
* :mod:`.tags`: the checkpoint tags on disk (manifests, hashes, ``latest``, retention).
"""

from bigbatch.sharding.deepspeed_checkpoint import list_checkpoints, load_checkpoint, save_checkpoint, verify_checkpoint
from bigbatch.sharding.deepspeed_config import DSConfigError, ResolvedConfig, load_ds_config, resolve_ds_config
from bigbatch.sharding.deepspeed_engine import (DeepSpeedEngine, build_engine, reports_grad_norm, set_engine_batch,
                                                step_with_grad_norm)
from bigbatch.sharding.deepspeed_state import rescale_engine
from bigbatch.sharding.full_state import FullState, IncompatibleCheckpoint, read_full_state
from bigbatch.sharding.tags import CheckpointError, CheckpointSaveError, NoUsableCheckpoint
from bigbatch.sharding.training_engine import TrainingEngine

__all__ = ["build_engine", "save_checkpoint", "load_checkpoint", "load_ds_config", "resolve_ds_config",
           "rescale_engine", "verify_checkpoint", "list_checkpoints", "CheckpointError", "CheckpointSaveError",
           "NoUsableCheckpoint", "DSConfigError", "ResolvedConfig", "reports_grad_norm", "set_engine_batch",
           "step_with_grad_norm", "TrainingEngine", "DeepSpeedEngine", "FullState", "IncompatibleCheckpoint",
           "read_full_state"]

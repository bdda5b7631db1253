"""DeepSpeed ZeRO engines carrying bigbatch's optimizers, and checkpoints that reshard.

``build_engine(model, ds_config, *, plan=None, param_groups=None, lr_scheduler=None)`` returns
``(engine, optimizer, lr_scheduler)``; ``save_checkpoint`` / ``load_checkpoint`` save atomically
(all or nothing, content-hashed) and resume on any world size and ZeRO stage, rescaling
hyperparameters when the global batch changes; :mod:`bigbatch.sharding.tags` manages the tags on
disk. See docs in each module.
"""

from bigbatch.sharding.checkpoint import (list_checkpoints, load_checkpoint, rescale_engine, save_checkpoint,
                                          verify_checkpoint)
from bigbatch.sharding.config import DSConfigError, ResolvedConfig, load_ds_config, resolve_ds_config
from bigbatch.sharding.engine import build_engine, reports_grad_norm, set_engine_batch, step_with_grad_norm
from bigbatch.sharding.tags import CheckpointError, CheckpointSaveError, NoUsableCheckpoint

__all__ = ["build_engine", "save_checkpoint", "load_checkpoint", "load_ds_config", "resolve_ds_config",
           "rescale_engine", "verify_checkpoint", "list_checkpoints", "CheckpointError", "CheckpointSaveError",
           "NoUsableCheckpoint", "DSConfigError",
           "ResolvedConfig", "reports_grad_norm", "set_engine_batch", "step_with_grad_norm"]

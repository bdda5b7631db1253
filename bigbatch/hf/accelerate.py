"""Accelerate helpers: our optimizer as the client optimizer of ``accelerate``'s DeepSpeed plugin.

``accelerate`` refuses a client optimizer when the plugin's DeepSpeed config has an ``"optimizer"``
block, and DeepSpeed does not know ours; :func:`take_optimizer_block` takes our block out of the
active plugin's config (in place: the plugin and its ``hf_ds_config`` share the dict) so the
script builds the optimizer itself. Call :func:`bigbatch.hf.init_distributed_state` before
``Accelerator()`` so the world size is right on CPU hosts.
"""

from __future__ import annotations

from bigbatch.hf.deepspeed import OptimizerBlock, split_optimizer_block


def take_optimizer_block(accelerator, optimizer_name: str | None = None) -> OptimizerBlock | None:
    """Remove our optimizer block from the accelerator's DeepSpeed config and return it.

    ``None`` without DeepSpeed or when the config has no block of ours (``"type": "auto"`` takes
    ``optimizer_name``). Raises ``DSConfigError`` naming the bad field.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    cfg, block = split_optimizer_block(plugin.deepspeed_config, optimizer_name)
    if block is not None:
        plugin.deepspeed_config.clear()
        plugin.deepspeed_config.update(cfg)
    return block


def decay_groups(model, weight_decay: float, no_decay=("bias", "norm")) -> list[dict]:
    """Two parameter groups as the HF Trainer makes them: decay, and no decay for biases and norms."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if any(k in name.lower() for k in no_decay) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]

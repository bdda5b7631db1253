"""Causal LMs from ``transformers`` configs (Llama by default, GPT-2 as an option), never
downloaded: weights are initialised locally from ``model.init_std`` and the run seed."""

from __future__ import annotations

import torch

from bigbatch.training.config import ConfigError, ModelConfig
from bigbatch.training.init_from import load_model


def padded_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """The embedding rows: ``cfg.vocab_size`` if set (must cover the tokenizer), else the
    tokenizer's size rounded up to ``cfg.pad_vocab_to``."""
    if cfg.vocab_size is not None:
        if cfg.vocab_size < tokenizer_vocab:

            raise ConfigError(f"model.vocab_size: {cfg.vocab_size} is smaller than the tokenizer's "
                              f"{tokenizer_vocab} tokens")
        return cfg.vocab_size
    m = cfg.pad_vocab_to
    return (tokenizer_vocab + m - 1) // m * m


def hf_config(cfg: ModelConfig, vocab_size: int, seq_len: int, *, eos_token_id: int | None = None):
    """The ``transformers`` config object for ``cfg``."""
    max_pos = cfg.max_position_embeddings or seq_len
    if cfg.arch == "llama":
        from transformers import LlamaConfig

        inter = cfg.intermediate_size or (int(8 * cfg.hidden_size / 3) + 63) // 64 * 64
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=inter,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=max_pos,
            rope_theta=cfg.rope_theta, initializer_range=cfg.init_std, attention_dropout=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings, use_cache=False,
            bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=None,
        )
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab_size, n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
        n_inner=cfg.intermediate_size, n_positions=max_pos, initializer_range=cfg.init_std,
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        tie_word_embeddings=cfg.tie_embeddings, use_cache=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id,
    )


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, *, seed: int = 0,
                eos_token_id: int | None = None, device: str | torch.device | None = None,
                init_weights: bool = True):
    """A freshly initialised ``AutoModelForCausalLM`` in fp32 (the engine casts for bf16/fp16), or
    ``cfg.init_from``'s (its weights unless ``init_weights`` is false: a resume loads its checkpoint).
    ``device="meta"`` builds without memory (parameter counting)."""
    from transformers import AutoModelForCausalLM

    if cfg.init_from and device != "meta":
        model = load_model(cfg, weights=init_weights)
        return model.to(device) if device is not None else model

    config = hf_config(cfg, vocab_size, seq_len, eos_token_id=eos_token_id)
    torch.manual_seed(seed)  # same init on every rank and every resume
    if device == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation,
                                             dtype=torch.float32)
    return model.to(device) if device is not None else model


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` each decoder block in place (Llama ``model.layers``, GPT-2 ``transformer.h``),
    or the whole model when it has none; returns ``model``. In place (``Module.compile``), so parameter
    names, state dicts and checkpoints are those of the eager model, and hooks registered later (FSDP2's,
    DeepSpeed's, tensor hooks on the parameters) see the same modules and parameters. The identical
    blocks share one compiled graph (parameters are graph inputs); a new micro-batch shape recompiles
    once, then runs with dynamic shapes. Call before ``fully_shard`` or ``deepspeed.initialize``."""
    from bigbatch.sharding.fsdp2_engine import decoder_blocks

    for module in decoder_blocks(model) or [model]:
        module.compile()
    return model


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once); a ZeRO-3 partitioned parameter by its full
    size (``ds_numel``: its local tensor is empty)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())

"""``model.init_from``: start a run from a Hugging Face causal LM (a directory, or a hub name with a
network), e.g. one that ``bigbatch export`` wrote.

:func:`apply_init_from` runs with the config's validation, before any work: the model must be a causal
LM, every ``model`` key the config sets (to other than its default) must agree with the model's
config (a mismatch is named), and the section is then filled from it, so ``config.resolved.yaml``
shows the architecture that trains. The model's tokenizer, when it has one, becomes the run's
(``tokenizer.kind: pretrained``); its vocabulary must fit the embedding. :func:`load_model` gives the
weights (or, for a resume from a checkpoint, only the architecture).

A run directory is self-contained: it keeps the model's config (``RUN_DIR/hf_config.json``) and
tokenizer (``RUN_DIR/tokenizer/``), and a resume, an export or ``check-rules --from`` takes both from
there (:func:`use_run_files`, ``model.arch_from``), so the ``init_from`` directory may move or go away
once the run has a checkpoint; only a run that restarts from step 0 reads its weights again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import torch

from bigbatch.errors import ConfigError

if TYPE_CHECKING:  # the config module calls this one while it validates
    from bigbatch.training.config import ModelConfig, RunConfig

# ModelConfig key -> the transformers config attribute (the generic names every causal LM maps)
_KEYS = {"hidden_size": "hidden_size", "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
         "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size",
         "max_position_embeddings": "max_position_embeddings", "vocab_size": "vocab_size",
         "tie_embeddings": "tie_word_embeddings", "rope_theta": "rope_theta"}
_ARCHS = {"llama": "llama", "gpt2": "gpt2"}


def source(init_from: str) -> str:
    """The directory (absolute, so a resume elsewhere finds it) or the hub name."""
    path = os.path.abspath(os.path.expanduser(init_from))
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or init_from.startswith((".", "/", "~")):
        raise ConfigError(f"model.init_from: {init_from!r} is not a directory (a Hugging Face model "
                          "directory or a hub name)")
    return init_from


def load_config(init_from: str):
    """The ``transformers`` config of ``init_from``; ConfigError when there is none or it is not a
    causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source(init_from))
    except ConfigError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"model.init_from: {init_from!r} is not a Hugging Face model (no usable config.json; "
                          f"a hub name needs a network): {first}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"model.init_from: {init_from!r} is a {config.model_type!r} model, not a causal LM "
                          "(AutoModelForCausalLM cannot load it); give a decoder such as llama or gpt2")
    return config


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # no tokenizer files: the config's tokenizer section stays in force
        return None


def use_run_files(cfg: RunConfig, run_dir: str, config_file: str, tokenizer_dir: str) -> None:
    """A run's saved config (before it is validated): when it came from ``model.init_from`` and the
    run directory holds its model config and tokenizer, take both from there instead."""
    config_file, tokenizer_dir = os.path.join(run_dir, config_file), os.path.join(run_dir, tokenizer_dir)
    if cfg.model.init_from and os.path.isfile(config_file) and os.path.isdir(tokenizer_dir):
        cfg.model.arch_from = os.path.abspath(config_file)
        cfg.tokenizer = dataclasses.replace(cfg.tokenizer, kind="pretrained", path=os.path.abspath(tokenizer_dir))


def apply_init_from(cfg: RunConfig) -> None:
    """Check ``cfg`` against ``cfg.model.init_from`` and take its architecture and tokenizer (see the
    module docstring); from the run's own files when ``model.arch_from`` is set (:func:`use_run_files`).
    ConfigError naming the disagreeing keys."""
    m = cfg.model
    if m.arch_from:
        path, config = cfg.tokenizer.path, _arch_config(m.arch_from)
    else:
        path = source(m.init_from)
        config = load_config(m.init_from)
    defaults = type(cfg.model)()
    found = {k: getattr(config, attr, None) for k, attr in _KEYS.items()}
    if found["num_kv_heads"] is None:
        found["num_kv_heads"] = found["num_heads"]
    mismatches = [f"model.{k}={getattr(m, k)!r} but the model has {v!r}" for k, v in found.items()
                  if v is not None and getattr(m, k) != getattr(defaults, k) and getattr(m, k) != v]
    arch = _ARCHS.get(config.model_type)
    if m.arch != defaults.arch and m.arch != arch:
        mismatches.insert(0, f"model.arch={m.arch!r} but the model is {config.model_type!r}")
    if mismatches:
        raise ConfigError(f"model.init_from: {m.init_from!r} disagrees with the config's model section: "
                          + "; ".join(mismatches) + " (remove those keys or make them agree)")
    for k, v in found.items():
        if v is not None and (k != "num_kv_heads" or v != found["num_heads"]):
            setattr(m, k, v)
    if arch:
        m.arch = arch
    if not m.arch_from:
        m.init_from = path
    if m.max_position_embeddings and cfg.data.seq_len > m.max_position_embeddings:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} exceeds model.init_from {path!r}'s "
                          f"max_position_embeddings {m.max_position_embeddings}")
    tok = _tokenizer(path)
    if tok is not None:
        if len(tok) > config.vocab_size:
            raise ConfigError(f"model.init_from: {path!r} has vocab_size {config.vocab_size}, smaller than its "
                              f"tokenizer's {len(tok)} tokens")
        cfg.tokenizer = dataclasses.replace(cfg.tokenizer, kind="pretrained", path=path)


def _arch_config(config_file: str):
    """The ``transformers`` config saved in a run directory (``hf_config.json``)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(config_file)
    except Exception as exc:
        raise ConfigError(f"model.init_from: the run's saved model config {config_file!r} cannot be read "
                          f"({type(exc).__name__}: {exc})") from None


def load_model(cfg: ModelConfig, *, weights: bool = True) -> torch.nn.Module:
    """``AutoModelForCausalLM`` of ``cfg.init_from`` in fp32 with its weights, or (``weights=False``: a
    resume, whose checkpoint brings them) only its architecture (the run's own ``hf_config.json`` when
    ``cfg.arch_from`` is set)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if weights:
        try:
            source(cfg.init_from)
        except ConfigError as exc:  # a resume before the first checkpoint, after the directory moved
            raise ConfigError(f"{exc}; this run has no checkpoint yet, so its first weights come from there") from None
        model = AutoModelForCausalLM.from_pretrained(cfg.init_from, dtype=torch.float32,
                                                     attn_implementation=cfg.attn_implementation)
    else:
        config = _arch_config(cfg.arch_from) if cfg.arch_from else AutoConfig.from_pretrained(cfg.init_from)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    return model

"""A run's checkpoint as a standard Hugging Face model directory, in one CPU process.

:func:`export_run` reads the newest good checkpoint of ``RUN_DIR/checkpoints`` (or a given tag) from
either engine, at whatever world size it was saved:

* DeepSpeed (any ZeRO stage): the full fp32 weight of every parameter that each checkpoint already
  holds in ``bigbatch_full_state_part<r>.pt`` (:mod:`bigbatch.sharding.deepspeed_checkpoint`), buffers and
  frozen weights from part 0;
* FSDP2: the ``model`` entries of the DCP shards, read without a process group into a model built on
  CPU (:mod:`bigbatch.sharding.fsdp2_checkpoint`); the optimizer's entries are not read.

It writes ``config.json``, ``model.safetensors`` (sharded with an index above ``max_shard_size``, as
``save_pretrained`` does), ``generation_config.json`` and the run's tokenizer into a temporary
directory beside ``out`` and renames it, so an export is there whole or not at all.
``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` need nothing
else.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

from bigbatch import atomic
from bigbatch import distributed as bbdist
from bigbatch.cli_parser import ArgumentParser, command_main
from bigbatch.sharding import tags
from bigbatch.sharding.full_state import read_full_state
from bigbatch.sharding.tags import CheckpointError
from bigbatch.training.config import ConfigError
from bigbatch.data.corpus import load_corpus
from bigbatch.training.model import hf_config
from bigbatch.training.run_dir import HF_CONFIG, RESOLVED, TOKENIZER_DIR, saved_config
from bigbatch.data.tokenizer import build_tokenizer

DEFAULT_SHARD_SIZE = "5GB"


def choose_tag(ckpt_dir: str, tag: str | None, arg: str = "RUN_DIR") -> tuple[str, list[tuple[str, str]]]:
    """``(tag, passed over)``: ``tag`` if it is good, else the newest good tag (``latest`` first, as a
    resume chooses) with ``(tag, why)`` for each one passed over; a ConfigError naming ``arg`` (or
    ``--tag``, listing the complete tags) and every refused tag when there is none. A file that would run
    code when loaded is refused outright (:class:`~bigbatch.sharding.tags.UnsafeCheckpoint`)."""
    if tag is not None:
        try:
            tags.verify_tag(ckpt_dir, tag)
        except tags.UnsafeCheckpoint:
            raise
        except CheckpointError as exc:
            good = tags.good_tags(ckpt_dir)
            raise ConfigError(f"--tag: {tag!r} is not a good checkpoint of {ckpt_dir!r} ({exc}); complete tags: "
                              f"{', '.join(good) if good else 'none'} (bigbatch status RUN_DIR --hash checks their "
                              "contents)") from None
        return tag, []
    order, refused = tags.candidates(ckpt_dir)
    for candidate in order:
        try:
            tags.verify_tag(ckpt_dir, candidate)
            return candidate, refused
        except tags.UnsafeCheckpoint:
            raise
        except CheckpointError as exc:
            refused.append((candidate, str(exc)))
    why = "; ".join(f"{t}: {w}" for t, w in refused) or "no complete checkpoint"
    raise ConfigError(f"{arg}: {os.path.dirname(ckpt_dir)!r} has no good checkpoint in {ckpt_dir!r} ({why})")


def model_config(run_dir: str, cfg=None):
    """The ``transformers`` config the run trained: ``RUN_DIR/hf_config.json`` (written at the start of
    every run), else rebuilt from the saved run config (runs from before that file existed)."""
    from transformers import AutoConfig

    path = os.path.join(run_dir, HF_CONFIG)
    if os.path.isfile(path):
        import json

        with open(path) as fh:
            data = json.load(fh)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    cfg = cfg or saved_config(run_dir, [], "RUN_DIR")
    resolved = _resolved(run_dir)
    tok = run_tokenizer(run_dir, cfg)
    return hf_config(cfg.model, int(resolved["vocab_size"]), cfg.data.seq_len, eos_token_id=tok.eos_token_id)


def _resolved(run_dir: str) -> dict:
    import yaml

    with open(os.path.join(run_dir, RESOLVED)) as fh:
        return (yaml.safe_load(fh) or {}).get("resolved", {})


def run_tokenizer(run_dir: str, cfg=None):
    """The run's tokenizer: ``RUN_DIR/tokenizer``, else the one its config names (a BPE from the data
    cache, a local directory or hub name) for runs from before the directory carried it."""
    from transformers import AutoTokenizer

    path = os.path.join(run_dir, TOKENIZER_DIR)
    if os.path.isdir(path):
        return AutoTokenizer.from_pretrained(path)

    cfg = cfg or saved_config(run_dir, [], "RUN_DIR")
    try:
        corpus = load_corpus(cfg.data) if cfg.tokenizer.kind == "bpe" else None
        return build_tokenizer(cfg.tokenizer, corpus, cfg.data.cache_dir, train=False)
    except (FileNotFoundError, ConfigError) as exc:
        raise ConfigError(f"RUN_DIR: {run_dir!r} has no {TOKENIZER_DIR}/ and its tokenizer cannot be found "
                          f"({exc})") from None


def load_weights(model: torch.nn.Module, tag_path: str, meta: dict) -> None:
    """Fill ``model`` (built on CPU in fp32) with the checkpoint's full weights, from either engine."""
    fs = read_full_state(os.path.dirname(tag_path), os.path.basename(tag_path), meta=meta, weights_only=True)
    persistent = set(model.state_dict())  # non-persistent buffers (rotary tables) are recomputed
    state = dict(fs.params)
    state.update({n: v for n, v in ((k.split(":", 1)[1], v) for k, v in fs.extras.items()) if n in persistent})
    expected = set(model.state_dict())
    tied = {n for n in expected if n not in state and _is_tied(model, n)}
    missing = sorted(expected - set(state) - tied)
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{tag_path}: its weights do not match the run's model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    model.tie_weights()


def _is_tied(model: torch.nn.Module, name: str) -> bool:
    """Whether state-dict entry ``name`` shares its storage with another entry (tied embeddings)."""
    sd = model.state_dict()
    ptr = sd[name].data_ptr()
    return any(k != name and v.data_ptr() == ptr for k, v in sd.items())


def export_run(run_dir: str, out: str, tag: str | None = None, overwrite: bool = False,
               max_shard_size: str | int = DEFAULT_SHARD_SIZE, say=None) -> str:
    """Write the checkpoint ``tag`` (default: the newest good one) of the run in ``run_dir`` as a Hugging
    Face model directory ``out`` (see the module docstring); returns ``out``. Bad input (no run, no good
    checkpoint, ``out`` not empty without ``overwrite``) raises a ConfigError naming the argument before
    anything is written. ``say(line)``: told which tag is exported and which were passed over and why."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(run_dir):
        raise ConfigError(f"RUN_DIR: {run_dir!r} is not a directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out: {out!r} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConfigError(f"--out: {out!r} exists and is not empty; pass --overwrite to replace it")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    chosen, passed = choose_tag(ckpt_dir, tag)
    if say is not None:
        for t, why in passed:
            say(f"export: passed over {t}: {why}")
        say(f"export: checkpoint {chosen!r} of {run_dir}")
    cfg = saved_config(run_dir, [], "RUN_DIR")
    tokenizer = run_tokenizer(run_dir, cfg)
    config = model_config(run_dir, cfg)
    config.use_cache = True  # training turned the KV cache off; generation wants it
    meta = tags.read_meta(ckpt_dir, chosen)
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_weights(model, os.path.join(ckpt_dir, chosen), meta)

    return write_model_dir(out, model, tokenizer, max_shard_size=max_shard_size)


def write_model_dir(out: str, model, tokenizer, *, max_shard_size) -> str:
    """``model`` (safetensors) and ``tokenizer`` as the Hugging Face directory ``out``, written beside
    it and renamed (whole or not at all; an existing ``out`` goes once the new one is whole), with
    the modes the umask gives."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}-export-")
    try:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if not os.path.isfile(os.path.join(tmp, "generation_config.json")):
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.honour_umask(tmp)
        if os.path.isdir(out):  # --overwrite (or an empty directory): the old one goes once the new is whole
            old = tempfile.mkdtemp(dir=parent, prefix=".old-export-")
            os.replace(out, os.path.join(old, "x"))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    """``bigbatch export RUN_DIR --out DIR [--tag TAG] [--overwrite] [--max-shard-size 5GB]``."""
    p = ArgumentParser(prog="bigbatch export",
                       description="Write a run's checkpoint as a Hugging Face model directory.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train.py run directory")
    p.add_argument("--out", required=True, help="the model directory to write (new or empty)")
    p.add_argument("--tag", default=None, help="the checkpoint tag (default: the newest good one)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", default=DEFAULT_SHARD_SIZE,
                   help="safetensors shards up to this size (e.g. 5GB, 500MB); an index lists them")

    def body() -> int:
        args = p.parse_args(argv)
        try:
            shard = int(args.max_shard_size) if args.max_shard_size.isdigit() else args.max_shard_size  # bytes
            path = export_run(args.run_dir, args.out, tag=args.tag, overwrite=args.overwrite, max_shard_size=shard,
                              say=lambda line: print(line, flush=True))
        except CheckpointError as exc:
            raise ConfigError(f"RUN_DIR: {exc}") from None
        except OSError as exc:  # --out's parent unwritable, a full disk: nothing was left behind
            raise ConfigError(f"--out: {args.out!r}: cannot be written ({exc.strerror or exc})") from None
        print(f"exported {args.run_dir} to {path}", flush=True)
        return 0

    return command_main(body, teardown=bbdist.destroy)

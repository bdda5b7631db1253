"""Run config: YAML + overrides -> typed RunConfig; bad keys and values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from bigbatch.training.config import (ConfigError, RunConfig, apply_overrides, config_from_dict, dump_yaml,
                                      load_config, parse_overrides)
from bigbatch.training.model import build_model, count_parameters, padded_vocab

REPO = Path(__file__).resolve().parents[1]


def test_tiny_yaml_types_and_overrides():
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      ["--model.hidden_size", "64", "--optim.hparams.lr=2e-3", "--batch.micro_batch_sizes", "8,4",
                       "--train.max_steps", "1e1", "--logging.plot", "false", "--model.num_kv_heads", "null"])
    assert isinstance(cfg, RunConfig)
    assert cfg.model.hidden_size == 64
    assert cfg.optim.hparams["lr"] == pytest.approx(2e-3) and isinstance(cfg.optim.hparams["lr"], float)
    assert cfg.optim.hparams["betas"] == [0.9, 0.99]
    assert cfg.batch.micro_batch_sizes == [8, 4]
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.logging.plot is False and cfg.model.num_kv_heads is None
    # PyYAML reads "3.0e-3" as float but "6e-4"-style strings must become floats too
    assert isinstance(load_config(None, ["--optim.hparams.lr", "6e-4"]).optim.hparams["lr"], float)


def test_round_trip_through_resolved_yaml(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["--train.seed", "7"])
    dump_yaml({**cfg.to_dict(), "resolved": {"x": 1}}, tmp_path / "c.yaml")
    import yaml

    data = yaml.safe_load((tmp_path / "c.yaml").read_text())
    data.pop("resolved")
    again = config_from_dict(data)
    assert again == cfg
    assert apply_overrides(again, [("train.seed", "8")]).train.seed == 8


@pytest.mark.parametrize("argv, needle", [
    (["--model.hiden_size", "3"], "unknown key 'model.hiden_size'; valid keys in 'model' are"),
    (["--modle.hidden_size", "3"], "unknown section 'modle'"),
    (["--model.hidden_size", "big"], "model.hidden_size: 'big' is not an integer"),
    (["--model.hidden_size", "2.5"], "model.hidden_size: '2.5' is not an integer"),
    (["--model.arch", "mamba"], "model.arch: 'mamba' is not allowed; choose one of ['llama', 'gpt2']"),
    (["--data.val_fraction", "1.5"], "data.val_fraction: 1.5 must be in (0, 1)"),
    (["--optim.name", "adamm"], "optim.name: optimizer: unknown name 'adamm'"),
    (["--batch.micro_batch_sizes", "0"], "batch.micro_batch_sizes: [0]"),
    (["--logging.plot", "maybe"], "logging.plot: 'maybe' is not a boolean"),
    (["--deepspeed.zero_stage", "4"], "deepspeed.zero_stage: 4 must be one of [0, 1, 2, 3]"),
    (["--model.hidden_size.x", "4"], "too deep"),
    (["hidden_size", "4"], "expected --section.key VALUE"),
    (["--model.hidden_size"], "missing value"),
    (["--model.hidden_size", "100", "--model.num_heads", "3"], "model.hidden_size: 100 is not divisible"),
])
def test_bad_values_are_named(argv, needle):
    with pytest.raises(ConfigError) as info:
        load_config(REPO / "configs" / "tiny.yaml", argv)
    assert needle in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  layers: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'model.layers'.*'num_layers'"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(bad)
    bad.write_text("optim:\n  hparams: {betas: [0.9, 0.99]}\n")
    with pytest.raises(ConfigError, match="optim.hparams.lr: required"):
        load_config(bad)


def test_parse_overrides_forms():
    assert parse_overrides(["--a.b", "1", "--c.d=x=y"]) == [("a.b", "1"), ("c.d", "x=y")]


@pytest.mark.parametrize("name, low, high", [("125m", 115e6, 135e6), ("350m", 330e6, 380e6), ("1.3b", 1.25e9, 1.4e9)])
def test_cluster_configs_build_at_their_size(name, low, high):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.batch.reference_global_batch * cfg.data.seq_len in (256 * 2048, 512 * 2048)
    assert cfg.optim.hparams["lr"] in (6e-4, 3e-4, 2e-4)
    model = build_model(cfg.model, padded_vocab(cfg.model, 50257), cfg.data.seq_len, device="meta")
    assert low < count_parameters(model) < high


def test_validate_has_no_side_effects_and_resolve_does_the_rest(tmp_path, monkeypatch):
    """validate() checks values only: it builds no optimizer, imports no W&B, fills no default; resolve()
    (what every loader ends with) does those, and refuses what only they can find."""
    import sys

    cfg = RunConfig()
    cfg.optim.hparams = {"lr": 1e-3, "betas": [1.5, 0.9]}  # a value only the optimizer itself refuses
    cfg.logging.wandb = True
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    built = []
    monkeypatch.setattr(type(cfg.optim), "check_constructs", lambda self: built.append(self))
    assert cfg.validate() is cfg and built == [] and cfg.batch.growth_min_tokens is None
    with pytest.raises(ConfigError, match="logging.wandb: true needs the wandb package"):
        cfg.resolve()
    assert len(built) == 1
    monkeypatch.undo()
    cfg.logging.wandb = False
    with pytest.raises(ConfigError, match=r"optim.hparams.betas: \[1.5, 0.9\] is refused by AdaBound"):
        cfg.resolve()
    cfg.optim.hparams["betas"] = [0.9, 0.99]
    cfg.schedule.warmup_tokens = 1234
    assert cfg.resolve().batch.growth_min_tokens == 1234

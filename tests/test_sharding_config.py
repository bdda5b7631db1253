"""DeepSpeed config resolution: refused before DeepSpeed starts, naming the field; "auto" filled."""

from __future__ import annotations

import glob
import json
import os
import pytest

from bigbatch.optim.registry import canonical_name
from bigbatch.scaling.planner import BatchPlan
from bigbatch.scaling.rules import rule_for
from bigbatch.sharding import DSConfigError, load_ds_config, resolve_ds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _Plan(**changes) -> BatchPlan:
    """A real BatchPlan for 2 ranks at twice the reference batch."""
    fields = dict(world_size=2, micro_batch=4, grad_accum=2, global_batch=16, reference_global_batch=8,
                  kappa=2.0, optimizer="amsbound",
                  hparams={"lr": 1.4e-3, "betas": (0.8, 0.998), "eps": 7e-9, "final_lr": 0.2, "gamma": 2e-3,
                           "weight_decay": 0.0})
    fields.update(changes)
    return BatchPlan(**fields, rule=rule_for(fields["optimizer"]))


def _cfg(**kw):
    cfg = {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
           "optimizer": {"type": "AdaBound", "params": {"lr": 1e-3}}, "zero_optimization": {"stage": 2}}
    cfg.update(kw)
    return cfg


def test_ours_becomes_client_optimizer():
    r = resolve_ds_config(_cfg(optimizer={"type": "aMsBoUnD", "params": {"lr": 2e-3, "betas": [0.9, 0.99]}}),
                          world_size=2)
    from bigbatch.optim import AMSBound

    assert r.optimizer_cls is AMSBound and r.optimizer_kwargs == {"lr": 2e-3, "betas": (0.9, 0.99)}
    assert "optimizer" not in r.ds_config and r.ds_config["zero_allow_untested_optimizer"] is True
    assert "zero_force_ds_cpu_optimizer" not in r.ds_config
    off = _cfg(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}})
    assert resolve_ds_config(off, world_size=2).ds_config["zero_force_ds_cpu_optimizer"] is False


def test_any_name_of_the_registry_is_built_by_bigbatch():
    """One registry decides: a class path in the JSON, or any optimizer a plan names, becomes the client
    optimizer; DeepSpeed's own type of the same name is not used then."""
    import torch

    from bigbatch.scaling import plan_batch

    r = resolve_ds_config(_cfg(optimizer={"type": "torch.optim.SGD", "params": {"lr": 0.1, "momentum": 0.9}}),
                          world_size=2)
    assert r.optimizer_cls is torch.optim.SGD and r.optimizer_kwargs == {"lr": 0.1, "momentum": 0.9}
    assert "optimizer" not in r.ds_config
    for name in ("torch.optim.AdamW", "adamw"):
        plan = plan_batch(2, [4], reference_global_batch=8, optimizer=name, hparams={"lr": 1e-3, "weight_decay": 0.1},
                          global_batch=16)
        for block in ({"type": "auto"}, {"type": "AdamW"}):
            r = resolve_ds_config(_cfg(train_batch_size="auto", gradient_accumulation_steps="auto",
                                       optimizer=block), world_size=2, plan=plan, optimizer_kwargs={"foreach": True})
            assert r.optimizer_cls is torch.optim.AdamW and r.optimizer_kwargs == {**plan.hparams, "foreach": True}
            assert r.optimizer_kwargs["lr"] == pytest.approx(1e-3 * 2**0.5)
    with pytest.raises(DSConfigError, match=r"optimizer.type='Lamb' but the batch plan was made for 'adamw'"):
        resolve_ds_config(_cfg(train_batch_size="auto", gradient_accumulation_steps="auto",
                               optimizer={"type": "Lamb"}), world_size=2, plan=plan)
    with pytest.raises(DSConfigError, match=r"optimizer.params: 'final_lr' is not an argument of AdamW"):
        resolve_ds_config(_cfg(train_batch_size="auto", gradient_accumulation_steps="auto", optimizer={"type": "auto"}),
                          world_size=2, plan=plan, optimizer_kwargs={"final_lr": 0.1})


def test_other_types_go_to_deepspeed_unchanged():
    block = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}}
    r = resolve_ds_config(_cfg(optimizer=block), world_size=2)
    assert r.optimizer_cls is None and r.ds_config["optimizer"] == block
    assert "zero_allow_untested_optimizer" not in r.ds_config


@pytest.mark.parametrize("cfg,world,match", [
    (_cfg(train_batch_size=12), 2, r"train_batch_size=12 != .*4 x 2 x 2 = 16"),
    (_cfg(optimizer={"type": "Adabelief"}), 2, r"optimizer.type='Adabelief': unknown"),
    (_cfg(zero_optimization={"stage": 4}), 2, r"zero_optimization.stage=4: must be 0, 1, 2 or 3"),
    (_cfg(zero_optimization={"stage": "2"}), 2, r"zero_optimization.stage='2'"),
    (_cfg(optimizer={"type": "RAdam", "params": {"final_lr": 0.1}}), 2,
     r"optimizer.params.final_lr: RAdam does not take it"),
    (_cfg(train_micro_batch_size_per_gpu="auto", train_batch_size=15), 2, r"train_batch_size=15 is not divisible"),
    (_cfg(elasticity={"enabled": True}), 2, r"elasticity"),
    (_cfg(optimizer={"type": "auto"}), 2, r"optimizer.type=\"auto\": only with a batch plan"),
    (_cfg(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}), 2,
     r"scheduler.params.warmup_num_steps=\"auto\""),
])
def test_refused_naming_the_field(cfg, world, match):
    with pytest.raises(DSConfigError, match=match):
        resolve_ds_config(cfg, world_size=world)


def test_batch_auto_fill_without_plan():
    r = resolve_ds_config(_cfg(train_micro_batch_size_per_gpu="auto"), world_size=2)
    assert r.ds_config["train_micro_batch_size_per_gpu"] == 4
    r = resolve_ds_config(_cfg(gradient_accumulation_steps="auto", train_batch_size=32), world_size=2)
    assert r.ds_config["gradient_accumulation_steps"] == 4
    r = resolve_ds_config({"train_micro_batch_size_per_gpu": 3}, world_size=3)
    assert (r.ds_config["train_batch_size"], r.ds_config["gradient_accumulation_steps"]) == (9, 1)


def test_plan_fills_batch_and_scaled_hparams():
    plan = _Plan()
    cfg = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
           "gradient_accumulation_steps": "auto", "optimizer": {"type": "auto", "params": {"lr": "auto"}},
           "zero_optimization": {"stage": 1, "reduce_bucket_size": "auto"}, "bf16": {"enabled": "auto"}}
    r = resolve_ds_config(cfg, world_size=2, plan=plan)
    assert (r.ds_config["train_batch_size"], r.ds_config["train_micro_batch_size_per_gpu"],
            r.ds_config["gradient_accumulation_steps"]) == (16, 4, 2)
    assert canonical_name(r.optimizer_name) == "amsbound" and r.optimizer_kwargs == plan.hparams
    assert "reduce_bucket_size" not in r.ds_config["zero_optimization"]  # no hidden size: DeepSpeed's default
    assert r.ds_config["bf16"]["enabled"] is False
    with pytest.raises(DSConfigError, match=r"train_batch_size=8 in the DeepSpeed config contradicts"):
        resolve_ds_config({**cfg, "train_batch_size": 8}, world_size=2, plan=plan)
    with pytest.raises(DSConfigError, match=r"plan.world_size=2 but the process group has world_size=4"):
        resolve_ds_config(cfg, world_size=4, plan=plan)
    with pytest.raises(DSConfigError, match=r"optimizer.type='RAdam' but the batch plan was made for 'amsbound'"):
        resolve_ds_config({**cfg, "optimizer": {"type": "RAdam"}}, world_size=2, plan=plan)


def test_hidden_size_fills_buckets():
    class M:
        class config:
            hidden_size = 64

    cfg = _cfg(zero_optimization={"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                  "stage3_param_persistence_threshold": "auto"})
    z = resolve_ds_config(cfg, world_size=2, model=M()).ds_config["zero_optimization"]
    assert (z["reduce_bucket_size"], z["stage3_prefetch_bucket_size"], z["stage3_param_persistence_threshold"]) \
        == (4096, 3686, 640)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "deepspeed", "*.json"))))
def test_shipped_configs_resolve_with_a_plan(path):
    for opt, hp in (("amsbound", _Plan().hparams), ("radam", {"lr": 1e-3, "betas": (0.9, 0.99)})):
        plan = _Plan(optimizer=opt, hparams=hp)
        r = resolve_ds_config(path, world_size=2, plan=plan)
        assert canonical_name(r.optimizer_name) == opt and r.ds_config["train_batch_size"] == 16
        assert r.zero_stage in (1, 2, 3)


def test_shipped_configs_cover_the_issue():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "deepspeed", "*.json"))}
    assert {"zero1.json", "zero2.json", "zero3.json", "zero2_bf16.json", "zero3_offload.json"} <= names
    assert load_ds_config(os.path.join(ROOT, "configs", "deepspeed", "zero2_bf16.json"))["bf16"]["enabled"] is True


def test_load_ds_config_errors(tmp_path):
    with pytest.raises(DSConfigError, match="does not exist"):
        load_ds_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(DSConfigError, match="not valid JSON"):
        load_ds_config(str(bad))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_cfg()))
    assert load_ds_config(good) == _cfg()


def test_param_group_overrides_are_scaled_like_the_defaults():
    """A group's lr/weight decay are reference-batch values: scaled by the plan's kappa too."""
    from bigbatch.scaling.rules import scale_hparams

    ref = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "final_lr": 0.1, "gamma": 1e-3, "weight_decay": 0.0}
    plan = _Plan(kappa=2.0, hparams=scale_hparams("amsbound", ref, 2.0), reference_hparams=ref)
    got = plan.scale_group({"lr": 3e-3, "foreach": True})
    want = scale_hparams("amsbound", {**ref, "lr": 3e-3}, 2.0)
    assert got["lr"] == pytest.approx(want["lr"], rel=1e-12) and got["foreach"] is True
    assert set(got) == {"lr", "foreach"}


def test_param_groups_refused_before_deepspeed_starts():
    import torch

    from bigbatch.sharding import build_engine

    model = torch.nn.Linear(2, 2)
    with pytest.raises(DSConfigError, match=r"param_groups\[1\].momentum: AdaBound does not take it"):
        build_engine(model, _cfg(train_batch_size=8, gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=4),
                     param_groups=[{"params": [model.weight]}, {"params": [model.bias], "momentum": 0.9}])
    with pytest.raises(DSConfigError, match=r"param_groups\[0\]: expected a dict with 'params'"):
        build_engine(model, _cfg(train_batch_size=8, train_micro_batch_size_per_gpu=4), param_groups=[[model.weight]])
    assert not torch.distributed.is_initialized()  # refused before any process group or engine

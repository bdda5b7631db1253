"""Batch planner: both policies, infeasible requests, agreement with the scaling rules."""

from __future__ import annotations

import pytest

from bigbatch.scaling import BatchPlan, plan_batch, scale_hparams
from bigbatch.scaling.rules import rule_for

REF = {"lr": 1e-3, "betas": (0.9, 0.999), "final_lr": 0.1, "gamma": 1e-3}


@pytest.mark.parametrize("world,micro,accum", [(1, 16, 6), (2, 16, 3), (3, 16, 2), (4, 8, 3), (6, 16, 1), (12, 8, 1)])
def test_fixed_keeps_reference_batch(world, micro, accum):
    plan = plan_batch(world, [4, 8, 16], reference_global_batch=96, optimizer="adabound", hparams=REF)
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (micro, accum, 96)
    assert plan.world_size * plan.micro_batch * plan.grad_accum == plan.global_batch
    assert plan.kappa == 1.0 and plan.optimizer == "adabound"
    assert {k: plan.hparams[k] for k in REF} == REF  # kappa = 1 is exact


def test_fixed_with_other_target_rescales():
    plan = plan_batch(4, 8, reference_global_batch=64, optimizer="sgd", hparams={"lr": 0.1}, global_batch=256)
    assert (plan.micro_batch, plan.grad_accum, plan.kappa) == (8, 8, 4.0)
    assert plan.hparams["lr"] == pytest.approx(0.4)


def test_scale_policy_follows_world_size():
    plans = {
        w: plan_batch(w, [2, 4], reference_global_batch=64, optimizer="adam", hparams={"lr": 1e-3},
                      policy="scale", per_device_batch=8)
        for w in (2, 8, 32)
    }
    assert [p.global_batch for p in plans.values()] == [16, 64, 256]
    assert [p.kappa for p in plans.values()] == [0.25, 1.0, 4.0]
    for p in plans.values():
        assert (p.micro_batch, p.grad_accum) == (4, 2)
        assert p.hparams == scale_hparams("adam", {"lr": 1e-3}, p.kappa)
    assert plans[32].hparams["lr"] == pytest.approx(2e-3)
    ams = plan_batch(8, 4, reference_global_batch=8, optimizer="adam", hparams={}, policy="scale",
                     per_device_batch=4, rule=rule_for("adam", beta_form="power"), overrides={"eps": 1e-8})
    assert ams.hparams["betas"] == pytest.approx((0.9**4, 0.999**4)) and ams.hparams["eps"] == 1e-8
    assert isinstance(ams, BatchPlan)


def test_infeasible_requests_list_nearest():
    with pytest.raises(ValueError) as err:
        plan_batch(3, [4, 8], reference_global_batch=100, optimizer="adam", hparams={})
    msg = str(err.value)
    assert "global_batch: 100 cannot be reached with world_size=3" in msg
    assert "96 (micro 8 x accum 4)" in msg and "108 (micro 4 x accum 9)" in msg
    with pytest.raises(ValueError, match=r"per_device_batch: 6 is not a multiple of any micro batch size \[4, 8\];"
                                         r" nearest feasible global batches on world_size=2: 8 .*16 "):
        plan_batch(2, [4, 8], reference_global_batch=16, optimizer="adam", hparams={}, policy="scale",
                   per_device_batch=6)
    for world in (0, -1):
        with pytest.raises(ValueError, match=rf"world_size: expected an int >= 1, got {world}; no global batch"):
            plan_batch(world, [4], reference_global_batch=16, optimizer="adam", hparams={})
    # paper-form betas invalid at this kappa: the scaling error reaches the caller unchanged
    with pytest.raises(ValueError, match="beta_form='power'"):
        plan_batch(64, 4, reference_global_batch=8, optimizer="adam", hparams={}, policy="scale", per_device_batch=4)


def test_argument_errors():
    common = dict(reference_global_batch=16, optimizer="adam", hparams={})
    with pytest.raises(ValueError, match="per_device_batch: required by policy='scale'"):
        plan_batch(2, [4], policy="scale", **common)
    with pytest.raises(ValueError, match="global_batch: only used by policy='fixed'"):
        plan_batch(2, [4], policy="scale", per_device_batch=8, global_batch=16, **common)
    with pytest.raises(ValueError, match="per_device_batch: only used by policy='scale'"):
        plan_batch(2, [4], per_device_batch=8, **common)
    with pytest.raises(ValueError, match="policy: must be 'fixed' or 'scale', got 'elastic'"):
        plan_batch(2, [4], policy="elastic", **common)
    with pytest.raises(ValueError, match="micro_batch_sizes: expected at least one"):
        plan_batch(2, [], **common)
    with pytest.raises(ValueError, match="micro_batch_sizes: expected an int >= 1, got 0"):
        plan_batch(2, [0, 4], **common)
    with pytest.raises(ValueError, match="reference_global_batch: expected an int >= 1, got 0"):
        plan_batch(2, [4], reference_global_batch=0, optimizer="adam", hparams={})
    with pytest.raises(ValueError, match="no batch-size scaling rule"):
        plan_batch(2, [4], reference_global_batch=16, optimizer="torch.optim.Adagrad", hparams={})

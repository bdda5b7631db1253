"""Scaling rules: every family's formulas, weight decay, beta forms, round trips, validation."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bigbatch.optim import AdaBound, AMSBound, RAdam, get_optimizer_class
from bigbatch.scaling import ScalingRuleWarning, scale_hparams, scale_steps
from bigbatch.scaling.rules import adabound_rule_derivation, noise_lr_factor

FAMILY_HPARAMS = {
    "adam": {"lr": 3e-4, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01},
    "adamw": {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1},
    "radam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "decoupled_weight_decay": True, "weight_decay": 0.05},
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "momentum": 0.5},
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True},
    "adabound": {"lr": 1e-3, "betas": (0.9, 0.999), "final_lr": 0.1, "gamma": 1e-3, "eps": 1e-8},
    "amsbound": {"lr": 1e-3, "final_lr": 0.05, "gamma": 2e-3, "weight_decay": 0.01, "decoupled_weight_decay": True},
}


def test_square_root_rule_adam_family():
    k = 4.0
    out = scale_hparams("adam", FAMILY_HPARAMS["adam"], k)
    assert out["lr"] == pytest.approx(6e-4)
    assert out["betas"] == pytest.approx((1 - 4 * 0.1, 1 - 4 * 0.02))
    assert out["eps"] == pytest.approx(5e-7)
    assert out["weight_decay"] == 0.01  # coupled L2: part of the gradient, unchanged

    out = scale_hparams("adamw", FAMILY_HPARAMS["adamw"], k)
    assert out["weight_decay"] == pytest.approx(0.2)  # decoupled: wd * sqrt(k)
    assert out["lr"] * out["weight_decay"] == pytest.approx(k * 3e-4 * 0.1)  # lr*wd grows like samples/step

    out = scale_hparams("adam", {**FAMILY_HPARAMS["adam"], "decoupled_weight_decay": True}, k)
    assert out["weight_decay"] == pytest.approx(0.02)

    out = scale_hparams("radam", FAMILY_HPARAMS["radam"], k)
    assert out["betas"] == pytest.approx((0.6, 0.996)) and out["weight_decay"] == pytest.approx(0.1)


def test_rmsprop_scales_alpha_keeps_momentum():
    out = scale_hparams("rmsprop", FAMILY_HPARAMS["rmsprop"], 9.0)
    assert out["lr"] == pytest.approx(3e-2)
    assert out["alpha"] == pytest.approx(1 - 9 * 0.01)
    assert out["eps"] == pytest.approx(1e-8 / 3)
    assert out["momentum"] == 0.5


def test_sgd_linear_rule_keeps_momentum_and_l2():
    out = scale_hparams("sgd", FAMILY_HPARAMS["sgd"], 8)
    assert out == {"lr": pytest.approx(0.8), "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True}
    assert scale_hparams(torch.optim.SGD, {"lr": 0.4}, 0.25)["lr"] == pytest.approx(0.1)


def test_adabound_derived_rule_and_effective_final_lr():
    k = 4.0
    ref = FAMILY_HPARAMS["adabound"]
    out = scale_hparams("adabound", ref, k, bound_form="linear")
    assert out["lr"] == pytest.approx(2e-3) and out["eps"] == pytest.approx(5e-9)
    assert out["final_lr"] == pytest.approx(0.4) and out["gamma"] == pytest.approx(4e-3)
    assert out["betas"] == pytest.approx((0.6, 0.996))
    # The optimizer sets base_lr to the constructor lr, so the effective final step is final_lr * k.
    opt = AdaBound([torch.nn.Parameter(torch.zeros(3))], **out)
    g = opt.param_groups[0]
    assert g["base_lr"] == pytest.approx(out["lr"])
    assert g["final_lr"] * g["lr"] / g["base_lr"] == pytest.approx(ref["final_lr"] * k)
    # the default: final_lr with Adam's lr (x sqrt(k)); every other value as above
    default = scale_hparams("adabound", ref, k)
    assert default == {**out, "final_lr": pytest.approx(0.2)}
    ams = scale_hparams(AMSBound, FAMILY_HPARAMS["amsbound"], k, bound_form="linear")
    assert ams["weight_decay"] == pytest.approx(0.02) and ams["final_lr"] == pytest.approx(0.2)
    assert scale_hparams(AMSBound, FAMILY_HPARAMS["amsbound"], k)["final_lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match=r"bound_form: must be one of \['sqrt', 'linear'\], got 'cubic'"):
        scale_hparams("adabound", ref, k, bound_form="cubic")
    # Users can replace any part of the derived rule.
    kept = scale_hparams("adabound", ref, k, overrides={"gamma": 1e-3, "final_lr": 0.1})
    assert kept["gamma"] == 1e-3 and kept["final_lr"] == 0.1 and kept["lr"] == pytest.approx(2e-3)
    doc = adabound_rule_derivation()
    assert "DERIVED" in doc and "gamma * kappa" in doc and "final_lr * kappa" in doc and 'bound_form="sqrt"' in doc


def test_defaults_are_filled_and_scaled():
    out = scale_hparams("adam", {"lr": 1e-3}, 4)
    assert out["betas"] == pytest.approx((0.6, 0.996)) and out["eps"] == pytest.approx(5e-9)
    out = scale_hparams("adamw", {}, 4)  # torch AdamW's default weight_decay=0.01 is decoupled
    assert out["weight_decay"] == pytest.approx(0.02) and out["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize("family", sorted(FAMILY_HPARAMS))
@pytest.mark.parametrize("beta_form", ["paper", "power"])
@pytest.mark.parametrize("kappa", [0.3, 2.5, 4.0, 7.0])
def test_round_trip(family, beta_form, kappa):
    ref = FAMILY_HPARAMS[family]
    there = scale_hparams(family, ref, kappa, beta_form=beta_form)
    back = scale_hparams(family, there, 1 / kappa, beta_form=beta_form)
    assert back.keys() == there.keys()
    for key, value in ref.items():
        assert back[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert ref == FAMILY_HPARAMS[family]  # input not modified
    if family != "sgd":
        assert there != back


def test_scaled_kwargs_build_real_optimizers():
    for family, hp in FAMILY_HPARAMS.items():
        out = scale_hparams(family, hp, 3.0, beta_form="power")
        opt = get_optimizer_class(family)([torch.nn.Parameter(torch.ones(2))], **out)
        assert opt.param_groups[0]["lr"] == pytest.approx(out["lr"])


def test_beta_forms():
    with pytest.raises(ValueError, match=r"beta1=0.9 at kappa=20.*outside \[0, 1\).*beta_form='power'"):
        scale_hparams("adam", {"betas": (0.9, 0.999)}, 20)
    with pytest.raises(ValueError, match=r"alpha=0.99 at kappa=200"):
        scale_hparams("rmsprop", {}, 200)
    out = scale_hparams("adam", {"betas": (0.9, 0.999)}, 20, beta_form="power")
    assert out["betas"] == pytest.approx((0.9**20, 0.999**20))
    # Equal to first order in (1 - beta): for small kappa * (1 - beta) the two forms agree.
    paper = scale_hparams("adam", {"betas": (0.999, 0.9999)}, 2)["betas"]
    power = scale_hparams("adam", {"betas": (0.999, 0.9999)}, 2, beta_form="power")["betas"]
    assert paper == pytest.approx(power, abs=2e-6)
    with pytest.raises(ValueError, match=r"beta_form: must be one of \['paper', 'power', 'keep_beta1', 'keep'\], got 'linear'"):
        scale_hparams("adam", {}, 2, beta_form="linear")
    with pytest.raises(ValueError, match=r"beta2: must be in \[0, 1\), got 1.0"):
        scale_hparams("adam", {"betas": (0.9, 1.0)}, 2)


def test_radam_rho_inf_guard():
    # (beta1 = 0.999 so that the paper form stays valid) beta2 = 0.999 -> 1 - beta2 = 1e-3 * kappa; rho_inf = 2 / (1e-3 * kappa) - 1 <= 5 from kappa = 333.4.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scale_hparams("radam", {"betas": (0.999, 0.999)}, 333)
    with pytest.warns(ScalingRuleWarning, match=r"rho_inf .* <= 5"):
        out = scale_hparams("radam", {"betas": (0.999, 0.999)}, 400)
    RAdam([torch.nn.Parameter(torch.ones(1))], **out)
    with pytest.raises(ValueError, match="degenerated_to_sgd=False"):
        scale_hparams("radam", {"betas": (0.999, 0.999), "degenerated_to_sgd": False}, 400)


def test_validation_errors():
    for bad in (0, -1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match="kappa"):
            scale_hparams("adam", {}, bad)
    with pytest.raises(ValueError, match=r"no batch-size scaling rule for torch.optim.adagrad.Adagrad"):
        scale_hparams(torch.optim.Adagrad, {}, 2)
    with pytest.raises(ValueError, match="unknown name 'lamb'"):
        scale_hparams("lamb", {}, 2)
    with pytest.raises(ValueError, match=r"hparams: 'momentum' is not an argument of Adam"):
        scale_hparams("adam", {"momentum": 0.9}, 2)
    with pytest.raises(ValueError, match=r"overrides: 'final_lr' is not an argument of Adam"):
        scale_hparams("adam", {}, 2, overrides={"final_lr": 0.1})
    with pytest.raises(ValueError, match="lr: expected a finite real number"):
        scale_hparams("sgd", {"lr": "fast"}, 2)


def test_subclass_uses_base_rule():
    class MyAdamW(torch.optim.AdamW):
        pass

    assert scale_hparams(MyAdamW, {"weight_decay": 0.1}, 4)["weight_decay"] == pytest.approx(0.2)


def test_deepspeed_cpu_adam_takes_adamw_rule():
    """DeepSpeed's CPU Adam (what ZeRO-Offload steps with) by its class path: AdamW's rule."""
    got = scale_hparams("deepspeed.ops.adam.DeepSpeedCPUAdam", {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8,
                                                                "weight_decay": 0.1}, 4)
    want = scale_hparams("adamw", {"lr": 1e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.1}, 4)
    assert got == want and got["lr"] == pytest.approx(2e-3)


def test_decoupled_decay_per_sample_is_kept():
    """Zero gradients: AdamW only decays. Same samples at B and 4B -> same weights to O((lr wd)^2)."""
    ref = {"lr": 1e-2, "weight_decay": 0.1}
    final = []
    for k in (1, 4):
        p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.AdamW([p], **scale_hparams("adamw", ref, k))
        for _ in range(400 // k):
            p.grad = torch.zeros_like(p)
            opt.step()
        final.append(float(p.detach()))
    assert final[0] == pytest.approx((1 - 1e-3) ** 400)
    assert final[1] == pytest.approx(final[0], rel=5e-3)  # 400 * (1e-3 * 4)^2 / 2 ~ 3e-3
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))  # unscaled decay at 4B decays 2x less per sample
    opt = torch.optim.AdamW([p], **scale_hparams("adamw", ref, 4, overrides={"weight_decay": 0.1}))
    for _ in range(100):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert abs(math.log(float(p.detach())) / math.log(final[0]) - 0.5) < 0.01


def test_scale_steps():
    assert scale_steps(1000, 4) == 250
    assert scale_steps(1000, 0.5) == 2000
    assert scale_steps(3, 8) == 1 and scale_steps(0, 8) == 0
    with pytest.raises(ValueError, match="steps: expected an int >= 0, got -5"):
        scale_steps(-5, 2)


@pytest.mark.parametrize("family", sorted(FAMILY_HPARAMS))
@pytest.mark.parametrize("beta_form", ["paper", "power"])
def test_rules_compose(family, beta_form):
    """Scaling by k1 then k2 equals scaling by k1 * k2 (a resumed run is rescaled relative to the saved one)."""
    ref = FAMILY_HPARAMS[family]
    two_steps = scale_hparams(family, scale_hparams(family, ref, 2.0, beta_form=beta_form), 1.5, beta_form=beta_form)
    one_step = scale_hparams(family, ref, 3.0, beta_form=beta_form)
    for key, value in one_step.items():
        assert two_steps[key] == pytest.approx(value, rel=1e-12), key


def test_beta_forms_that_keep_betas_still_scale_lr_and_eps():
    ref = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    k1 = scale_hparams("adamw", ref, 4, beta_form="keep_beta1")
    assert k1["betas"] == (0.9, pytest.approx(1 - 4 * 0.05))
    keep = scale_hparams("adamw", ref, 4, beta_form="keep")
    assert keep["betas"] == (0.9, 0.95)
    for hp in (k1, keep):
        assert hp["lr"] == pytest.approx(2e-3) and hp["eps"] == pytest.approx(5e-9)
        assert hp["weight_decay"] == pytest.approx(0.2)
    assert scale_hparams("adabound", {"betas": (0.9, 0.999)}, 2, beta_form="keep_beta1")["betas"][0] == 0.9


@pytest.mark.parametrize("second_moment", ["rescale", "keep"])
def test_second_moment_at_a_batch_change(second_moment):
    """On pure gradient noise (variance 1/B per coordinate) Adam's second moment settles at 1/B; at a
    change to 4B, ``rescale`` keeps the squared first moment and divides the rest by kappa, which
    starts it near the new batch's 1/(4B) (where it then settles); ``keep`` leaves the old value.
    First moments are kept, step counters become step / kappa, AMSBound's max moves with its moment."""
    from bigbatch.scaling.rescale import rescale_optimizer
    from bigbatch.scaling.rules import rule_for

    torch.manual_seed(0)
    batch, kappa = 16, 4.0
    p = torch.nn.Parameter(torch.zeros(20_000))
    opt = AMSBound([p], lr=1e-3, betas=(0.9, 0.99), final_lr=0.1)
    for _ in range(600):
        p.grad = torch.randn_like(p) / math.sqrt(batch)
        opt.step()
    state = opt.state[p]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    assert float(before["exp_avg_sq"].mean()) == pytest.approx(1 / batch, rel=0.02)
    report = rescale_optimizer(opt, kappa, rule_for(AMSBound, second_moment=second_moment))
    assert report["second_moments"] == (2 if second_moment == "rescale" else 0)
    assert torch.equal(state["exp_avg"], before["exp_avg"])
    v = before["exp_avg_sq"]
    mean_sq = before["exp_avg"].square() * (1 - 0.99**600) / (1 - 0.9**600) ** 2  # m_hat^2 in v's scale
    want = v - (1 - 1 / kappa) * (v - mean_sq).clamp(min=0) if second_moment == "rescale" else v
    assert torch.allclose(state["exp_avg_sq"], want, rtol=1e-5, atol=0)
    assert torch.allclose(state["max_exp_avg_sq"], before["max_exp_avg_sq"] * want / before["exp_avg_sq"], rtol=1e-5)
    # 1 is the new batch's noise; rescale keeps the first moment's own noise, (1 - beta1) / (1 + beta1) of it, too
    start = float(state["exp_avg_sq"].mean()) * kappa * batch
    assert (1 < start < 1.2) if second_moment == "rescale" else (start == pytest.approx(kappa, rel=0.02))
    assert float(state["step"]) == 600 / kappa
    for _ in range(300):  # the new batch's noise: the moment settles near where rescale put it
        p.grad = torch.randn_like(p) / math.sqrt(kappa * batch)
        opt.step()
    assert float(state["exp_avg_sq"].mean()) == pytest.approx(1 / (kappa * batch), rel=0.05)
    with pytest.raises(ValueError, match=r"second_moment: must be one of \['rescale', 'divide', 'keep'\], got 'half'"):
        rescale_optimizer(opt, 2.0, rule_for(AMSBound, second_moment="half"))
    # a refused call moved nothing
    assert float(state["step"]) == 300 + 600 / kappa and opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 2)


@pytest.mark.parametrize("mean", [0.0, 3.0])
def test_second_moment_keeps_the_squared_mean(mean):
    """Where the gradient's mean dominates, the rescaled moment keeps it (a pure mean is not divided
    at all); ``divide`` divides all of it."""
    from types import SimpleNamespace

    from bigbatch.scaling.rescale import rescale_second_moments
    from bigbatch.scaling.rules import rule_for

    p, m = torch.nn.Parameter(torch.zeros(4)), torch.full((4,), mean)
    state = {"step": torch.tensor(1e6), "exp_avg": m.clone(), "exp_avg_sq": m.square() + 0.5}
    opt = SimpleNamespace(param_groups=[{"betas": (0.9, 0.99), "params": [p]}], state={p: state})
    assert rescale_second_moments(opt, 2.0, rule_for("adam")) == 1
    assert torch.allclose(state["exp_avg_sq"], m.square() + 0.25)
    assert rescale_second_moments(opt, 2.0, rule_for("adam", second_moment="divide")) == 1  # all of it
    assert torch.allclose(state["exp_avg_sq"], (m.square() + 0.25) / 2)


def test_second_moment_early_in_training_uses_the_bias_corrected_moments():
    """At step 10 with beta2 0.999 the raw second moment is about 1% of its corrected value while the
    raw first moment is 65% of the mean: comparing them uncorrected would call the whole moment
    'mean'. Corrected, a steady gradient (mean 1, no noise) keeps its moment and a pure-noise one is
    divided by kappa; the moment never grows."""
    from bigbatch.scaling.rescale import rescale_optimizer

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(2, 10_000))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    for _ in range(10):
        p.grad = torch.stack([torch.ones(10_000), torch.randn(10_000)])  # row 0: mean only, row 1: noise only
        opt.step()
    before = opt.state[p]["exp_avg_sq"].clone()
    rescale_optimizer(opt, 4.0)
    ratio = opt.state[p]["exp_avg_sq"] / before
    assert float(ratio.max()) <= 1.0 + 1e-6 and float(ratio.min()) >= 0.25 - 1e-6
    assert float(ratio[0].mean()) == pytest.approx(1.0, abs=1e-5)  # the mean is not divided
    # noise: m_hat^2 is the first moment's own noise, (1 - beta1)/(1 + beta1)-ish of v_hat after 10 steps
    assert 0.25 < float(ratio[1].mean()) < 0.45


@pytest.mark.parametrize("optimizer", ["adamw", "radam", "adabound"])
def test_noise_lr_factor_keeps_adams_sde_near_the_critical_batch(optimizer):
    """Per coordinate v = mu^2 + sigma^2 / B: with lr x sqrt(kappa) x the factor, the drift and the diffusion
    per sample at kappa x B equal those at B, which the square-root rule alone undershoots."""
    mu, sigma, lr, batch, kappa = 0.3, 3.0, 1e-3, 16, 4
    b_noise = sigma**2 / mu**2  # 100 samples

    def per_sample(b, eta):
        v = mu**2 + sigma**2 / b
        return eta * mu / math.sqrt(v) / b, eta**2 * (sigma**2 / b) / v / b  # drift, diffusion

    factor = noise_lr_factor(optimizer, kappa * batch, batch, b_noise)
    assert factor == pytest.approx(math.sqrt((1 + 64 / 100) / (1 + 16 / 100)))
    for got, want in zip(per_sample(kappa * batch, lr * math.sqrt(kappa) * factor), per_sample(batch, lr)):
        assert got == pytest.approx(want, rel=1e-12)
    plain = per_sample(kappa * batch, lr * math.sqrt(kappa))
    assert plain[0] < 0.85 * per_sample(batch, lr)[0]  # the rule alone: steps 16% short here
    # the paper's regime (batch far below the noise scale) and the other limit
    assert noise_lr_factor(optimizer, 64, 16, 1e9) == pytest.approx(1.0, abs=1e-6)
    assert noise_lr_factor(optimizer, 64, 16, 1e-6) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("b_noise", [None, float("nan"), 0.0, -3.0])
def test_noise_lr_factor_is_one_without_a_measurement_at_the_reference_or_for_sgd(b_noise):
    assert noise_lr_factor("adamw", 64, 16, b_noise) == 1.0
    assert noise_lr_factor("adamw", 16, 16, 40.0) == 1.0
    assert noise_lr_factor("sgd", 64, 16, 40.0) == 1.0

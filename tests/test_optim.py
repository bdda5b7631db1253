"""AdaBound / AMSBound / RAdam: exact to the papers' algorithms, torch.optim.RAdam and the
official AdaBound code, in every implementation (fused: the C kernel on CPU float32 or the
torch.compile kernel; foreach; single)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from bigbatch.optim import AdaBound, AMSBound, RAdam, canonical_name, get_optimizer_class

COMPILED = pytest.param("compiled", marks=pytest.mark.slow)  # Inductor compiles: seconds per graph
IMPLS = ["fused", COMPILED, "foreach", "single"]  # compiled: fused with the C kernel turned off


def impl_kwargs(impl: str) -> dict:
    return {"fused": {"fused": True}, "compiled": {"fused": True}, "foreach": {"foreach": True},
            "single": {"foreach": False, "fused": False}}[impl]


@pytest.fixture
def impl(request, monkeypatch):
    """The implementation named by the test's parameter (``indirect``); sets up "compiled"."""
    if request.param == "compiled":
        monkeypatch.setenv("BIGBATCH_NATIVE_KERNELS", "0")
    return request.param


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(17, 5, generator=gen).to(dtype).requires_grad_(),
            torch.randn(33, generator=gen).to(dtype).requires_grad_()]


def grad_sequence(params, steps, seed=1):
    """The same gradients for every implementation, so rounding cannot feed back."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) * (1 + t % 3) for p in params] for t in range(steps)]


def run(opt_factory, steps=40, dtype=torch.float32, scheduler=None):
    params = make_params(dtype=dtype)
    opt = opt_factory(params)
    sched = scheduler(opt) if scheduler else None
    for grads in grad_sequence(params, steps):
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        if sched:
            sched.step()
    return [p.detach().clone() for p in params], opt


# ---- references written from the papers' algorithms (float64, one tensor at a time) ----

def reference_adabound(steps, lr=1e-2, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
                       weight_decay=0.0, amsbound=False, decoupled=False, lr_at=lambda t: 1.0):
    """Luo et al. 2019, Algorithm 2/3 with the official code's eps and bias-correction placement."""
    params = [p.detach().double() for p in make_params()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    for t, grads in enumerate(grad_sequence(params, steps), start=1):
        lr_t = lr * lr_at(t - 1)  # the scheduler's lr in force at step t
        for i, g in enumerate(grads):
            g = g.double()
            if weight_decay and not decoupled:
                g = g + weight_decay * params[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            vmax[i] = torch.maximum(vmax[i], v[i])
            denom = (vmax[i] if amsbound else v[i]).sqrt() + eps
            step_size = lr_t * math.sqrt(1 - b2**t) / (1 - b1**t)
            final = final_lr * lr_t / lr
            lower = final * (1 - 1 / (gamma * t + 1))
            upper = final * (1 + 1 / (gamma * t)) if gamma else math.inf  # gamma=0: plain Adam
            if decoupled:
                params[i] = params[i] * (1 - lr_t * weight_decay)
            params[i] = params[i] - torch.clamp(step_size / denom, lower, upper) * m[i]
    return params


def reference_radam(steps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                    decoupled=False, degenerated_to_sgd=True):
    """Liu et al. 2020, Algorithm 2; below the threshold torch's momentum step or no step."""
    params = [p.detach().double() for p in make_params()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    b1, b2 = betas
    rho_inf = 2 / (1 - b2) - 1
    for t, grads in enumerate(grad_sequence(params, steps), start=1):
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        for i, g in enumerate(grads):
            g = g.double()
            if weight_decay and not decoupled:
                g = g + weight_decay * params[i]
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1**t)
            if rho_t > 5:
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                step = lr * r * m_hat * math.sqrt(1 - b2**t) / (v[i].sqrt() + eps)
            elif degenerated_to_sgd:
                step = lr * m_hat
            else:
                continue
            if decoupled:
                params[i] = params[i] * (1 - lr * weight_decay)
            params[i] = params[i] - step
    return params


def assert_close_params(actual, expected, rtol=1e-5, atol=2e-6):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=atol)


# ---- exactness ----

ADABOUND_CASES = [
    dict(),
    dict(amsbound=True),
    dict(weight_decay=0.05),
    dict(weight_decay=0.05, decoupled=True),
    dict(amsbound=True, weight_decay=0.05, decoupled=True, gamma=0.05, final_lr=0.05),
    dict(gamma=0.0),
]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("case", ADABOUND_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_adabound_matches_paper_reference(impl, case):
    kw = dict(case)
    decoupled = kw.pop("decoupled", False)
    got, opt = run(lambda ps: AdaBound(ps, lr=1e-2, decoupled_weight_decay=decoupled, **kw, **impl_kwargs(impl)))
    assert_close_params(got, reference_adabound(40, decoupled=decoupled, **kw))
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if kw.get("amsbound") else set())
    assert float(state["step"]) == 40.0
    assert "step" not in opt.param_groups[0]


@pytest.mark.parametrize("amsbound", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adabound_matches_official_package(amsbound, weight_decay):
    import adabound  # the official implementation (dev extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the official code uses deprecated add_ signatures
        official, _ = run(lambda ps: adabound.AdaBound(ps, lr=1e-2, amsbound=amsbound, weight_decay=weight_decay))
    ours, _ = run(lambda ps: AdaBound(ps, lr=1e-2, amsbound=amsbound, weight_decay=weight_decay))
    assert_close_params(ours, official, rtol=1e-6, atol=1e-6)


RADAM_CASES = [dict(), dict(weight_decay=0.05), dict(weight_decay=0.05, decoupled_weight_decay=True),
               dict(betas=(0.8, 0.99), eps=1e-6)]


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
@pytest.mark.parametrize("case", RADAM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_radam_matches_torch_and_paper(impl, case):
    ours, _ = run(lambda ps: RAdam(ps, lr=1e-2, **case, **impl_kwargs(impl)))
    theirs, _ = run(lambda ps: torch.optim.RAdam(ps, lr=1e-2, **case))
    assert_close_params(ours, theirs, rtol=1e-6, atol=1e-6)
    ref_kw = dict(case)
    ref_kw["decoupled"] = ref_kw.pop("decoupled_weight_decay", False)
    assert_close_params(ours, reference_radam(40, **ref_kw))


@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_radam_official_mode_does_not_move_below_threshold(impl):
    beta2 = 0.999
    rho_inf = 2 / (1 - beta2) - 1
    first_rectified = next(t for t in range(1, 100) if rho_inf - 2 * t * beta2**t / (1 - beta2**t) > 5)
    assert first_rectified == 6  # steps 1..5 are below the threshold with beta2 = 0.999
    start = [p.detach().clone() for p in make_params()]
    below, _ = run(lambda ps: RAdam(ps, lr=1e-2, degenerated_to_sgd=False, **impl_kwargs(impl)), steps=5)
    assert all(torch.equal(a, b) for a, b in zip(below, start))
    moved, _ = run(lambda ps: RAdam(ps, lr=1e-2, degenerated_to_sgd=True, **impl_kwargs(impl)), steps=5)
    assert not torch.equal(moved[0], start[0])
    later, _ = run(lambda ps: RAdam(ps, lr=1e-2, degenerated_to_sgd=False, **impl_kwargs(impl)), steps=30)
    assert_close_params(later, reference_radam(30, degenerated_to_sgd=False))


# ---- base lr, schedulers, groups, checkpoints ----

@pytest.mark.parametrize("impl", IMPLS, indirect=True)
def test_bounds_follow_lr_scheduler_through_base_lr(impl):
    def factor(t):
        return 0.5 ** (t // 10)

    got, opt = run(lambda ps: AdaBound(ps, lr=1e-2, gamma=0.1, **impl_kwargs(impl)),
                   scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, factor))
    assert opt.param_groups[0]["base_lr"] == 1e-2
    assert_close_params(got, reference_adabound(40, gamma=0.1, lr_at=factor))


def test_base_lr_is_per_group_and_survives_regrouping():
    a, b = make_params()
    opt = AdaBound([{"params": [a], "lr": 1e-2}, {"params": [b], "lr": 1e-3, "final_lr": 0.01}])
    assert [g["base_lr"] for g in opt.param_groups] == [1e-2, 1e-3]
    # DeepSpeed drops empty groups and narrows groups; base_lr travels with its group.
    del opt.param_groups[0]
    b.grad = torch.ones_like(b)
    opt.step()
    assert opt.param_groups[0]["base_lr"] == 1e-3
    restored = AdaBound([b], lr=5.0)
    restored.load_state_dict(opt.state_dict())
    assert restored.param_groups[0]["base_lr"] == 1e-3 and restored.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("cls", [AdaBound, AMSBound, RAdam])
@pytest.mark.parametrize("impl", ["fused", COMPILED, "foreach"], indirect=True)
def test_state_dict_round_trip_continues_bit_identically(cls, impl):
    params = make_params()
    opt = cls(params, lr=1e-2, **impl_kwargs(impl))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    grads = grad_sequence(params, 30)

    def steps(ps, o, s, gs):
        for g_list in gs:
            for p, g in zip(ps, g_list):
                p.grad = g.clone()
            o.step()
            s.step()

    steps(params, opt, sched, grads[:15])
    saved = (copy.deepcopy([p.detach() for p in params]), copy.deepcopy(opt.state_dict()), sched.state_dict())
    steps(params, opt, sched, grads[15:])

    resumed = [p.clone().requires_grad_() for p in saved[0]]
    opt2 = cls(resumed, lr=123.0, **impl_kwargs(impl))
    opt2.load_state_dict(saved[1])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=7, gamma=0.5)
    sched2.load_state_dict(saved[2])
    steps(resumed, opt2, sched2, grads[15:])
    for x, y in zip(params, resumed):
        assert torch.equal(x.detach(), y.detach())


def test_per_group_lr_and_weight_decay():
    a, b = make_params()
    opt = AdaBound([{"params": [a]}, {"params": [b], "lr": 0.0, "weight_decay": 0.1}], lr=1e-2,
                   decoupled_weight_decay=True)
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert not torch.equal(a, a0)
    assert torch.equal(b, b0)  # lr 0: no step and no decoupled decay (lr * wd = 0)


@pytest.mark.parametrize("cls", [AdaBound, AMSBound, RAdam])
def test_bf16_params_track_fp32(cls):
    fp32, _ = run(lambda ps: cls(ps, lr=1e-2), steps=20)
    bf16, opt = run(lambda ps: cls(ps, lr=1e-2), steps=20, dtype=torch.bfloat16)
    assert bf16[0].dtype == torch.bfloat16
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16
    for a, b in zip(bf16, fp32):
        # bf16 keeps 8 bits of mantissa; a rounding can flip one coordinate's clamp branch.
        diff = (a.float() - b).abs()
        assert diff.mean() < 1e-2 and diff.max() < 0.15, diff


def test_closure_returns_loss_and_is_evaluated_with_grad():
    w = torch.zeros(3, requires_grad=True)
    opt = AdaBound([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = ((w - torch.tensor([1.0, 2.0, 3.0])) ** 2).sum()
        loss.backward()
        return loss

    first = opt.step(closure)
    assert first.item() == pytest.approx(14.0)
    assert w.abs().sum() > 0


@pytest.mark.parametrize("cls", [AdaBound, AMSBound, RAdam])
def test_sparse_gradients_are_refused(cls):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        cls(emb.parameters()).step()


@pytest.mark.parametrize("cls,kwargs,field", [
    (AdaBound, dict(lr=-1e-3), "lr"),
    (AdaBound, dict(eps=-1.0), "eps"),
    (AdaBound, dict(weight_decay=-0.1), "weight_decay"),
    (AdaBound, dict(betas=(1.0, 0.999)), "beta1"),
    (AdaBound, dict(betas=(0.9, -0.1)), "beta2"),
    (AdaBound, dict(final_lr=0.0), "final_lr"),
    (AdaBound, dict(gamma=1.0), "gamma"),
    (AMSBound, dict(gamma=-0.5), "gamma"),
    (RAdam, dict(lr=-1.0), "lr"),
    (RAdam, dict(betas=(0.9, 1.0)), "beta2"),
    (RAdam, dict(weight_decay=-1e-2), "weight_decay"),
])
def test_invalid_hyperparameters_name_the_argument_and_value(cls, kwargs, field):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=field) as info:
        cls(make_params(), **kwargs)
    assert repr(value if not isinstance(value, tuple) else value[0 if field == "beta1" else 1]) in str(info.value)


def test_fused_kernel_does_not_recompile_as_lr_and_step_change(monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("BIGBATCH_NATIVE_KERNELS", "0")  # the torch.compile kernel (CUDA, bf16)
    params = make_params()
    opt = AdaBound(params, lr=1e-2, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    grads = grad_sequence(params, 8)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()
    before = counters["stats"]["unique_graphs"]
    for g_list in grads[1:]:
        for p, g in zip(params, g_list):
            p.grad = g
        opt.step()
        sched.step()
    assert counters["stats"]["unique_graphs"] == before


# ---- the C kernel (CPU float32) ----

NATIVE_CASES = [
    (AdaBound, dict()),
    (AdaBound, dict(weight_decay=0.05, gamma=0.0)),
    (AMSBound, dict(weight_decay=0.05, decoupled_weight_decay=True)),
    (AMSBound, dict(betas=(0.9, 0.6))),  # v falls below its max: the kernel skips those stores
    (RAdam, dict()),
    (RAdam, dict(degenerated_to_sgd=False, weight_decay=0.05)),
    (RAdam, dict(betas=(0.6, 0.99), weight_decay=0.05, decoupled_weight_decay=True)),  # lerp weight >= 0.5
]


@pytest.mark.slow
@pytest.mark.parametrize("cls,kw", NATIVE_CASES, ids=lambda x: x.__name__ if isinstance(x, type) else str(x))
def test_native_kernel_equals_compiled_kernel_bit_for_bit(cls, kw, monkeypatch):
    from bigbatch.optim import _native

    assert _native.library() is not None  # gcc is present here, so the C path is what runs
    # Sizes around the 65536-float chunks, an empty tensor, and a NaN that must propagate.
    sizes = [0, 1, 7, 65535, 65536, 65537, 3 * 65536 + 5]

    def trajectory():
        gen = torch.Generator().manual_seed(3)
        ps = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
        opt = cls(ps, lr=1e-2, fused=True, **kw)
        for t in range(13):  # ends on a step with the smallest gradients
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen) * (1 + t % 3)
            if t == 5:
                ps[3].grad[17] = float("nan")
            opt.step()
        return [p.detach() for p in ps], opt

    native, opt = trajectory()
    monkeypatch.setenv("BIGBATCH_NATIVE_KERNELS", "0")
    compiled, want_opt = trajectory()
    for a, b in zip(native, compiled):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    assert native[3][17].isnan() and not native[3][16].isnan()
    if cls is AMSBound:  # maxima are stored only for cache lines where one moved: same bits
        got = [opt.state[p]["max_exp_avg_sq"] for p in opt.param_groups[0]["params"]]
        want = [want_opt.state[p]["max_exp_avg_sq"] for p in want_opt.param_groups[0]["params"]]
        assert all(torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) for a, b in zip(got, want))
        if kw.get("betas"):  # the last step's small gradients left most maxima where they were
            v = opt.state[opt.param_groups[0]["params"][6]]["exp_avg_sq"]
            assert (got[6] > v).float().mean() > 0.5
    assert set(opt.state[opt.param_groups[0]["params"][2]]) >= {"step", "exp_avg", "exp_avg_sq"}


def test_native_kernel_build_is_cached_and_a_broken_compiler_falls_back(tmp_path, monkeypatch):
    from bigbatch.optim import _native

    monkeypatch.setenv("BIGBATCH_KERNEL_CACHE", str(tmp_path / "ok"))
    built = _native.build("gcc")
    stamp = built.stat().st_mtime_ns
    assert _native.build("gcc") == built and built.stat().st_mtime_ns == stamp  # not rebuilt
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary left behind

    expected, _ = run(lambda ps: AdaBound(ps, lr=1e-2, fused=True))
    monkeypatch.setenv("BIGBATCH_KERNEL_CACHE", str(tmp_path / "broken"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    _native.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU optimizer kernels failed"):
            got, _ = run(lambda ps: AdaBound(ps, lr=1e-2, fused=True))
    finally:
        _native.library.cache_clear()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))  # the compiled kernel took over
    assert list((tmp_path / "broken").iterdir()) == []


def test_impl_can_be_forced_by_environment(monkeypatch):
    from bigbatch.optim import _fused

    params = make_params()
    monkeypatch.setenv("BIGBATCH_OPTIM_IMPL", "single")
    assert _fused.choose_impl(params, None, None) == "single"
    monkeypatch.setenv("BIGBATCH_OPTIM_IMPL", "bogus")
    with pytest.raises(ValueError, match="BIGBATCH_OPTIM_IMPL"):
        _fused.choose_impl(params, None, None)


# ---- convergence on real problems ----

# final_lr = lr / 2.5: the SGD phase must be stable, and Rosenbrock's valley allows lr < ~5e-3.
MODES = [
    ("adabound", lambda ps, impl, lr: AdaBound(ps, lr=lr, final_lr=lr / 2.5, **impl_kwargs(impl))),
    ("amsbound", lambda ps, impl, lr: AMSBound(ps, lr=lr, final_lr=lr / 2.5, **impl_kwargs(impl))),
    ("adabound-decoupled", lambda ps, impl, lr: AdaBound(ps, lr=lr, final_lr=lr / 2.5, weight_decay=1e-4,
                                                         decoupled_weight_decay=True, **impl_kwargs(impl))),
    ("radam", lambda ps, impl, lr: RAdam(ps, lr=lr, **impl_kwargs(impl))),
    ("radam-official", lambda ps, impl, lr: RAdam(ps, lr=lr, degenerated_to_sgd=False, **impl_kwargs(impl))),
    ("radam-decoupled", lambda ps, impl, lr: RAdam(ps, lr=lr, weight_decay=1e-4, decoupled_weight_decay=True,
                                                   **impl_kwargs(impl))),
]


@pytest.mark.parametrize("impl", ["fused", "foreach"], indirect=True)
@pytest.mark.parametrize("name,make", MODES, ids=[m[0] for m in MODES])
def test_converges_on_rosenbrock(name, make, impl):
    # lr 1e-2: RAdam's un-rectified first steps (momentum SGD) diverge on Rosenbrock above ~2e-2.
    xy = torch.tensor([-1.5, 2.0], requires_grad=True)
    opt = make([xy], impl, 1e-2)

    def rosen(v):
        return (1 - v[0]) ** 2 + 100 * (v[1] - v[0] ** 2) ** 2

    start = rosen(xy).item()
    for _ in range(5000):
        opt.zero_grad()
        loss = rosen(xy)
        loss.backward()
        opt.step()
    assert rosen(xy).item() < 1e-3 * start, (name, xy)


@pytest.mark.parametrize("name,make", MODES, ids=[m[0] for m in MODES])
def test_converges_on_noisy_linear_regression(name, make):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=gen)
    w_true = torch.randn(16, 1, generator=gen)
    y = x @ w_true + 0.01 * torch.randn(512, 1, generator=gen)
    model = torch.nn.Linear(16, 1)
    opt = make(list(model.parameters()), "fused", 5e-2)
    for step in range(600):
        idx = torch.randint(0, 512, (32,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
        opt.step()
    final = torch.nn.functional.mse_loss(model(x), y).item()
    assert final < 5e-3, (name, final)


# ---- registry ----

def test_registry_resolves_names_paths_and_classes():
    assert get_optimizer_class("AdaBound") is AdaBound
    assert get_optimizer_class("radam") is RAdam
    assert get_optimizer_class("torch.optim.AdamW") is torch.optim.AdamW
    assert get_optimizer_class("bigbatch.optim.AMSBound") is AMSBound
    assert canonical_name(AMSBound) == "amsbound"
    assert canonical_name("torch.optim.SGD") == "sgd"
    with pytest.raises(ValueError, match="unknown name 'lamb'"):
        get_optimizer_class("lamb")
    with pytest.raises(ValueError, match="cannot import"):
        get_optimizer_class("torch.optim.Nope")


# ---- one compiled graph per chunk of equal-size tensors (the CUDA and bf16 path) ----


@pytest.mark.slow
def test_compiled_path_compiles_a_graph_per_chunk_signature_once(monkeypatch):
    """30 tensors of 3 sizes: chunks of up to 8 equal-size tensors (8 + 2 per size) are 6 graphs,
    compiled at the first step; later steps, a new lr and a new step count compile nothing."""
    from torch._dynamo.utils import counters

    from bigbatch.optim import _fused

    monkeypatch.setenv("BIGBATCH_NATIVE_KERNELS", "0")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (96, 160, 224) for _ in range(10)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    assert len(_fused.chunks([(p, p, p, p, None) for p in params])) == 6
    torch._dynamo.reset()
    counters.clear()
    opt, ref_opt = AdaBound(params, lr=1e-2, fused=True), AdaBound(ref, lr=1e-2, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda t: 1.0 / (1 + t))
    graphs = []
    for step in range(5):
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [6] * 5
    for p, q in zip(params, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("impl", [COMPILED, "foreach", "single"], indirect=True)
@pytest.mark.parametrize("cls", [AdaBound, AMSBound, RAdam])
def test_bf16_params_with_float32_state(cls, impl):
    """state_dtype=float32: full-precision moments beside bf16 weights, the update computed in float32
    and rounded once into the weights: it follows the float32 run to bf16 precision."""
    got, opt = run(lambda ps: cls(ps, lr=1e-2, state_dtype=torch.float32, **impl_kwargs(impl)), steps=20,
                   dtype=torch.bfloat16)
    want, _ = run(lambda ps: cls(ps, lr=1e-2), steps=20)
    for state in opt.state.values():
        assert all(v.dtype == torch.float32 for k, v in state.items() if k != "step")
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        diff = (g.float() - w).abs()  # as in test_bf16_params_track_fp32: 8 bits of mantissa in the weights
        assert diff.mean() < 1e-2 and diff.max() < 0.15, diff
    with pytest.raises(ValueError, match="state_dtype"):
        cls(make_params(), state_dtype=torch.int32)


def test_roofline_passes_move_every_stream():
    """The benchmark's roofline kernels (csrc STREAM7/STREAM9) read and write what the updates do."""
    from bigbatch.optim import _native

    p, g, m, v, x = (torch.full((70000,), float(i + 1)) for i in range(5))
    assert _native.step("stream7", [p], [g], [m], [v], [None], [0.0] * 10)
    assert (p == 2).all() and (m == 1).all() and (v == 7).all()
    assert _native.step("stream9", [p], [g], [m], [v], [x], [0.0] * 10)
    assert (p == 2 + 5).all() and (m == 2).all() and (v == 8).all() and (x == 7).all()


def test_prefetch_choice_is_measured_once_per_machine(tmp_path, monkeypatch):
    from bigbatch.optim import _native

    monkeypatch.setenv("BIGBATCH_KERNEL_CACHE", str(tmp_path))
    cc = _native._compiler()
    monkeypatch.setenv("BIGBATCH_KERNEL_PREFETCH", "on")
    assert _native.prefetch_choice(cc) == "on" and not list(tmp_path.glob("prefetch-*"))
    monkeypatch.delenv("BIGBATCH_KERNEL_PREFETCH")
    choice = _native.prefetch_choice(cc)
    memo = list(tmp_path.glob("prefetch-*.txt"))
    assert choice in ("on", "off") and len(memo) == 1 and memo[0].read_text() == choice
    assert len(list(tmp_path.glob("adam_family-*.so"))) == 2  # both builds, measured against each other


def test_adabound_bound_counts_match_the_step_sizes():
    """bound_counts: coordinates whose step size lies below / above the bounds, from the state."""
    import math

    from bigbatch.optim import AdaBound

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = AdaBound([p], lr=1e-2, betas=(0.9, 0.99), final_lr=0.5, gamma=0.1, eps=1e-8)
    for _ in range(3):
        p.grad = torch.randn(1000) * torch.logspace(-4, 1, 1000)
        opt.step()
    below, above, total = opt.bound_counts()
    v, t = opt.state[p]["exp_avg_sq"], 3.0
    rate = 1e-2 * math.sqrt(1 - 0.99**t) / (1 - 0.9**t) / (v.sqrt() + 1e-8)
    lower, upper = 0.5 * (1 - 1 / (0.1 * t + 1)), 0.5 * (1 + 1 / (0.1 * t))
    assert total == 1000 and 0 < below < 1000 and 0 < above < 1000
    assert below == int((rate < lower).sum()) and above == int((rate > upper).sum())


@pytest.mark.parametrize("impl", ["single", "fused-native", "foreach"])
@pytest.mark.parametrize("cls", ["adabound", "amsbound", "radam"])
def test_a_step_skipped_on_the_device_changes_nothing(cls, impl, monkeypatch):
    """``found_inf`` set (a NaN gradient): weights, moments and AMSGrad's maximum keep their bits, and the
    step counter is back where it was once the skips are settled; ``found_inf`` clear: the same update as
    without it. The single-tensor update masks on the device (what the compiled one runs on a GPU)."""
    from bigbatch.optim import registry

    if impl != "fused-native":
        monkeypatch.setenv("BIGBATCH_OPTIM_IMPL", impl)
    torch.manual_seed(0)
    make = registry.get_optimizer_class(cls)
    a, b = torch.nn.Parameter(torch.randn(64)), None
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = make([a], lr=1e-2), make([b], lr=1e-2)
    for step in range(4):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.found_inf = torch.zeros(())
        opt_a.step()
        opt_b.step()
        assert torch.equal(a, b), step  # found_inf clear: the ordinary update
    before = {k: v.clone() for k, v in opt_a.state[a].items()}
    weight = a.detach().clone()
    a.grad = torch.full((64,), float("nan"))
    opt_a.found_inf = torch.ones(())
    opt_a.step()
    assert torch.equal(a, weight)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in before:
            assert torch.equal(opt_a.state[a][key], before[key]), key
    assert opt_a.settle_steps() == 1 and float(opt_a.state[a]["step"]) == float(before["step"])
    assert opt_a.settle_steps() == 0

"""The step loop, state and validation shared by AdaBound/AMSBound and RAdam."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.optim import Optimizer

from bigbatch.optim import _fused, _native


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: in-place updates reach the DTensor), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def check_state_dtype(state_dtype) -> None:
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise ValueError(f"Invalid state_dtype: {state_dtype!r} (None: the parameter's dtype, or a floating "
                         "torch.dtype such as torch.float32)")


def check_hparams(*, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Raise ValueError naming the argument and value for an invalid Adam hyperparameter."""
    if isinstance(lr, torch.Tensor) or not lr >= 0.0:
        raise ValueError(f"Invalid lr: {lr!r} (must be a float >= 0)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be >= 0)")
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta{i + 1} (betas[{i}]): {beta!r} (must be in [0, 1))")


class AdamFamily(Optimizer):
    """Adam-style state (``step``, ``exp_avg``, ``exp_avg_sq``, optional ``max_exp_avg_sq``).

    Every parameter has its own ``step`` (a 0-d float32 CPU tensor, as in torch's Adam), so that
    DeepSpeed ZeRO's flat partitions and its checkpoints carry it like any other state.

    Subclasses define ``_kernel_name``, ``_body`` (the elementwise update of one tensor, taking
    the per-step scalars as a float32 tensor), ``_scalars`` (those scalars for a step count),
    ``_still`` (the scalars of an update that changes nothing) and ``_foreach_update`` (the same update
    with torch's multi-tensor ops).

    A step can be skipped on the device, as torch's fused optimizers do for a GradScaler: with
    ``optimizer.found_inf`` set (a scalar tensor, nonzero when a gradient is not finite), the compiled
    and single-tensor updates run with :meth:`_still`'s scalars where it is set (weights, moments and
    AMSGrad's maximum unchanged) on gradients zeroed where it is set (a NaN times 0 is still NaN), so
    nothing is read; the update itself stays the one the C kernel computes bit for bit. The host's step counters
    still advance; the skips are counted on the device and taken off at :meth:`settle_steps` (the loop's
    next sync point), so until then the bias corrections count the skipped step. The C kernel (CPU
    tensors, no device to wait for) and the multi-tensor update read ``found_inf`` and skip outright.
    """

    _kernel_name: str
    _step_supports_amp_scaling = True  # take found_inf as torch's fused optimizers do

    def _uses_max(self, group: dict) -> bool:
        return False

    @staticmethod
    def _body(*args) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _scalars(self, group: dict, step: float) -> list[float]:  # pragma: no cover
        raise NotImplementedError

    def _still(self, s: list[float]) -> list[float]:  # pragma: no cover
        raise NotImplementedError

    def _foreach_update(self, group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, s: list[float]):
        raise NotImplementedError  # pragma: no cover

    def _init_group(self, group: dict):
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = [], [], [], [], [], []
        uses_max = self._uses_max(group)
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; "
                                   "use torch.optim.SparseAdam for sparse parameters")
            state = self.state[p]
            dtype = group.get("state_dtype") or p.dtype
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            if uses_max and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            # DTensors (FSDP2): the update is elementwise, so it runs on each rank's local shard as
            # plain tensors: no all-gather, no DTensor dispatch per operation. The states were made
            # with zeros_like, so they are DTensors placed like the parameter (checkpoints reshard them).
            params.append(_local(p))
            grads.append(_local(p.grad))
            exp_avgs.append(_local(state["exp_avg"]))
            exp_avg_sqs.append(_local(state["exp_avg_sq"]))
            max_sqs.append(_local(state["max_exp_avg_sq"]) if uses_max else None)
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        skip = None  # the flag read (once a step) by the updates that cannot mask on the device
        if found_inf is not None:
            self._skipped = found_inf.detach().clone() if getattr(self, "_skipped", None) is None \
                else self._skipped + found_inf
            skip = functools.cache(lambda: bool(found_inf))
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = self._init_group(group)
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)
            impl = _fused.choose_impl(params, group.get("foreach"), group.get("fused"))
            # Parameters created or first given a gradient at different times have different
            # step counts; each count has its own bias corrections and bounds.
            by_step: dict[float, list[int]] = {}
            for i, t in enumerate(steps):
                by_step.setdefault(float(t), []).append(i)
            for t, idx in by_step.items():
                s = self._scalars(group, t)
                pick = (lambda xs: [xs[i] for i in idx]) if len(idx) != len(params) else (lambda xs: xs)
                self._update(impl, group, pick(params), pick(grads), pick(exp_avgs),
                             pick(exp_avg_sqs), pick(max_sqs), s, found_inf, skip)
        return loss

    def settle_steps(self) -> int:
        """Take the steps skipped on the device since the last call off every step counter (one read);
        returns how many."""
        skipped, self._skipped = getattr(self, "_skipped", None), None
        n = int(skipped) if skipped is not None else 0
        if n:
            for state in self.state.values():
                if "step" in state:
                    state["step"] -= n
        return n

    def _native_kind(self, group: dict) -> str:
        return self._kernel_name

    def _update(self, impl, group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, s: list[float], found_inf=None,
                skip=None):
        native = impl == "fused" and _native.enabled() and all(
            _native.supports(ts) for ts in zip(params, grads, exp_avgs, exp_avg_sqs, max_sqs))
        if found_inf is not None and (impl == "foreach" or native) and skip():
            return  # host tensors (the C kernel) or no compiled update: read the flag and skip outright
        if impl == "foreach":
            self._foreach_update(group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, s)
            return
        if native and _native.step(self._native_kind(group), params, grads, exp_avgs, exp_avg_sqs, max_sqs, s):
            return  # CPU float32: the whole group in one C call
        args = []
        for i, p in enumerate(params):
            # detach(): same storage; a tensor that requires grad would make the compiled kernel
            # write the parameter in a second pass (measured: 1.6x slower steps).
            t = (p.detach(), grads[i], exp_avgs[i], exp_avg_sqs[i], max_sqs[i])
            if impl == "fused" and all(x is None or x.is_contiguous() for x in t):
                t = tuple(x if x is None else x.view(-1) for x in t)  # 1-D: equal sizes share a graph
            args.append(t)
        by_device: dict[torch.device, list[int]] = {}
        for i, t in enumerate(args):
            by_device.setdefault(t[0].device, []).append(i)
        for device, idx in by_device.items():
            scal = _fused.scalar_tensor(s, device)
            if found_inf is not None:  # the still update where a gradient is not finite: nothing read
                skip = found_inf.to(device) > 0
                scal = torch.where(skip, _fused.scalar_tensor(self._still(s), device), scal)
                for i in idx:  # the step's gradients are dropped after it, so in place
                    args[i][1].masked_fill_(skip, 0.0)
            if impl == "single":
                for i in idx:
                    type(self)._body(*args[i], scal)
                continue
            left = _fused.run_fused(self._kernel_name, type(self)._body, [args[i] for i in idx], scal)
            if left:  # the compile failed: these go multi-tensor
                rest = [idx[i] for i in left]
                self._foreach_update(group, *([lst[i] for i in rest]
                                              for lst in (params, grads, exp_avgs, exp_avg_sqs, max_sqs)), s)

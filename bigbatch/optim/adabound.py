"""AdaBound and AMSBound (Luo, Xiong, Liu and Sun, ICLR 2019).

Adam whose per-coordinate step size is clipped into bounds ``[eta_l(t), eta_u(t)]`` that start at
``[0, inf)`` and tighten towards ``final_lr``, so that training passes smoothly from Adam to SGD
with learning rate ``final_lr``. The update follows the official implementation
(github.com/Luolc/AdaBound):

    g      <- g + weight_decay * p                      (coupled L2, the default)
    m      <- beta1 * m + (1 - beta1) * g
    v      <- beta2 * v + (1 - beta2) * g^2
    vmax   <- max(vmax, v)                              (AMSBound; v below means vmax)
    denom  =  sqrt(v) + eps                             (eps before the bias correction)
    alpha  =  lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    final  =  final_lr * lr / base_lr                   (the bounds follow lr's schedule)
    eta_l  =  final * (1 - 1 / (gamma * t + 1))
    eta_u  =  final * (1 + 1 / (gamma * t))
    p      <- p - clamp(alpha / denom, eta_l, eta_u) * m

With ``decoupled_weight_decay=True`` the L2 term is dropped and ``p <- p * (1 - lr * weight_decay)``
precedes the update (as in AdamW).

``base_lr`` is kept in each parameter group (set to the group's lr when the group is added), not
in a list beside the groups as the official code does: it then survives LR schedulers, checkpoint
round trips, and DeepSpeed regrouping or dropping empty groups.
"""

from __future__ import annotations

import math

import torch

from bigbatch.optim._base import AdamFamily, _local, check_hparams, check_state_dtype


class AdaBound(AdamFamily):
    """AdaBound (``amsbound=False``) or AMSBound (``amsbound=True``).

    Args:
        params: parameters or parameter groups; a group may set its own ``lr``, ``final_lr``,
            ``base_lr`` and the other hyperparameters.
        lr: Adam learning rate (the step size of the early, adaptive phase).
        betas: EMA coefficients of the gradient and of its square.
        final_lr: the SGD learning rate the bounds converge to, relative to ``base_lr``.
        gamma: convergence speed of the bounds; the bound width is about ``1 / (gamma * t)``.
        eps: added to ``sqrt(v)``.
        weight_decay: L2 penalty (coupled), or decoupled decay rate with
            ``decoupled_weight_decay=True``.
        amsbound: keep ``max_exp_avg_sq`` and divide by its square root (AMSGrad's fix).
        foreach, fused: implementation choice as in torch; ``None`` picks the fused
            (compiled) kernel where torch.compile works, else multi-tensor ops.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``; None: the parameter's.
            ``torch.float32`` with bf16 parameters keeps full-precision moments (the update is
            computed in float32 either way and rounded once into the parameter).
    """

    _kernel_name = "adabound"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 final_lr: float = 0.1, gamma: float = 1e-3, eps: float = 1e-8,
                 weight_decay: float = 0.0, amsbound: bool = False,
                 decoupled_weight_decay: bool = False, *, foreach: bool | None = None,
                 fused: bool | None = None, state_dtype: torch.dtype | None = None):
        check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_state_dtype(state_dtype)
        if not final_lr > 0.0:
            raise ValueError(f"Invalid final_lr: {final_lr!r} (must be > 0)")
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Invalid gamma: {gamma!r} (must be in [0, 1))")
        defaults = dict(lr=lr, betas=tuple(betas), final_lr=final_lr, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, amsbound=amsbound,
                        decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, fused=fused,
                        state_dtype=state_dtype)
        super().__init__(params, defaults)

    #: a parameter group's keys besides the constructor's: the lr the bounds' ``final_lr`` belongs to
    group_keys = ("base_lr",)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("base_lr", group["lr"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts from before base_lr was kept
            group.setdefault("base_lr", group["lr"])
            group.setdefault("decoupled_weight_decay", False)

    def _uses_max(self, group: dict) -> bool:
        return bool(group["amsbound"])

    def _native_kind(self, group: dict) -> str:
        return "amsbound" if group["amsbound"] else "adabound"

    def _scalars(self, group: dict, step: float) -> list[float]:
        beta1, beta2 = group["betas"]
        lr, wd, gamma = group["lr"], group["weight_decay"], group["gamma"]
        decoupled = group["decoupled_weight_decay"]
        step_size = lr * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        base_lr = group["base_lr"]
        # A group built with lr 0 stays frozen: schedulers scale from 0, so the bounds do too.
        final_lr = group["final_lr"] * (lr / base_lr if base_lr > 0 else float(lr > 0))
        lower = final_lr * (1.0 - 1.0 / (gamma * step + 1.0))
        upper = final_lr * (1.0 + 1.0 / (gamma * step)) if gamma > 0 else math.inf
        # [b1, 1-b1, b2, 1-b2, eps, coupled L2, decay factor, step size, lower, upper]
        return [beta1, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"],
                0.0 if decoupled else wd, 1.0 - lr * wd if decoupled else 1.0,
                step_size, lower, upper]

    def _still(self, s: list[float]) -> list[float]:
        """Moments kept (beta 1, weight 0), no decay, a step clipped to [0, 0]."""
        return [1.0, 0.0, 1.0, 0.0, s[4], 0.0, 1.0, 0.0, 0.0, 0.0]

    @torch.no_grad()
    def bound_counts(self) -> tuple[torch.Tensor | int, torch.Tensor | int, int]:
        """``(below, above, total)``: coordinates whose next step size ``step_size / (sqrt(v) + eps)``
        lies below the lower bound, above the upper bound (counts left on the device: nothing is read),
        and all coordinates with state (a sharded optimizer counts its own shard). The clipped share
        tracks the passage from Adam (none clipped) to SGD with momentum (all clipped at ``final_lr``).
        Costs one pass over v."""
        below = above = total = 0
        for group in self.param_groups:
            key = "max_exp_avg_sq" if self._uses_max(group) else "exp_avg_sq"
            for p in group["params"]:
                state = self.state.get(p)
                if not state or key not in state:
                    continue
                step = float(state["step"])
                if step < 1:
                    continue
                s = self._scalars(group, step)
                rate = s[7] / (_local(state[key]).float().sqrt() + s[4])
                below = below + (rate < s[8]).sum()
                above = above + (rate > s[9]).sum()
                total += rate.numel()
        return below, above, total

    @staticmethod
    def _body(p, g, m, v, vmax, s):
        # float32 arithmetic whatever the storage (no-ops for float32 tensors)
        pf = p.float()
        g = g.float() + s[5] * pf
        m_new = m.float() * s[0] + g * s[1]
        v_new = v.float() * s[2] + g * g * s[3]
        if vmax is not None:
            v_new_max = torch.maximum(vmax.float(), v_new)
            vmax.copy_(v_new_max)
            denom = v_new_max.sqrt() + s[4]
        else:
            denom = v_new.sqrt() + s[4]
        update = torch.clamp(s[7] / denom, min=s[8], max=s[9]) * m_new
        p.copy_(pf * s[6] - update)
        m.copy_(m_new)
        v.copy_(v_new)

    def _foreach_update(self, group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, s):
        b1, c1, b2, c2, eps, l2, decay, step_size, lower, upper = s
        if l2 != 0.0:
            grads = torch._foreach_add(grads, params, alpha=l2)
        if grads and grads[0].dtype != exp_avgs[0].dtype:  # bf16 weights, float32 state (state_dtype)
            grads = [g.to(exp_avgs[0].dtype) for g in grads]
        torch._foreach_mul_(exp_avgs, b1)
        torch._foreach_add_(exp_avgs, grads, alpha=c1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=c2)
        if group["amsbound"]:
            torch._foreach_maximum_(max_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, eps)
        torch._foreach_reciprocal_(denom)
        torch._foreach_mul_(denom, step_size)
        torch._foreach_clamp_min_(denom, lower)
        if math.isfinite(upper):
            torch._foreach_clamp_max_(denom, upper)
        torch._foreach_mul_(denom, exp_avgs)
        if decay != 1.0:
            torch._foreach_mul_(params, decay)
        torch._foreach_sub_(params, denom)


class AMSBound(AdaBound):
    """AdaBound with AMSGrad's running maximum of the second moment (``max_exp_avg_sq``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 final_lr: float = 0.1, gamma: float = 1e-3, eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *,
                 foreach: bool | None = None, fused: bool | None = None,
                 state_dtype: torch.dtype | None = None):
        super().__init__(params, lr=lr, betas=betas, final_lr=final_lr, gamma=gamma, eps=eps,
                         weight_decay=weight_decay, amsbound=True,
                         decoupled_weight_decay=decoupled_weight_decay, foreach=foreach,
                         fused=fused, state_dtype=state_dtype)

"""RAdam (Liu, Jiang, He, Chen, Liu, Gao and Han, ICLR 2020).

Adam whose adaptive step is multiplied by a rectification term that cancels the excess variance
of the adaptive learning rate in the first steps, a warmup derived from the variance:

    m      <- beta1 * m + (1 - beta1) * g
    v      <- beta2 * v + (1 - beta2) * g^2
    rho_inf = 2 / (1 - beta2) - 1
    rho_t   = rho_inf - 2 t beta2^t / (1 - beta2^t)
    if rho_t > 5:   p <- p - lr * r_t * (m / (1 - beta1^t)) * sqrt(1 - beta2^t) / (sqrt(v) + eps)
                    r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    else:           p <- p - lr * m / (1 - beta1^t)      (degenerated_to_sgd=True, the default)
                    p unchanged                           (degenerated_to_sgd=False)

The default matches ``torch.optim.RAdam`` exactly (an un-rectified momentum step while
``rho_t <= 5``, i.e. the first 4 steps with beta2 = 0.999). ``degenerated_to_sgd=False`` selects
the official repository's alternative (github.com/LiyuanLucasLiu/RAdam, ``RAdam(...,
degenerated_to_sgd=False)``): no parameter update at all until the rectification engages, while
the moments still accumulate. Weight decay is L2 added to the gradient, or with
``decoupled_weight_decay=True`` ``p <- p * (1 - lr * weight_decay)`` on every step that updates.
"""

from __future__ import annotations

import math

import torch

from bigbatch.optim._base import AdamFamily, check_hparams, check_state_dtype

RECTIFY_THRESHOLD = 5.0  # rho_t must exceed this for the variance to be tractable


class RAdam(AdamFamily):
    """Rectified Adam.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: EMA coefficients of the gradient and of its square.
        eps: added to ``sqrt(v)``.
        weight_decay: L2 penalty, or decoupled decay rate with ``decoupled_weight_decay=True``.
        degenerated_to_sgd: while ``rho_t <= 5``, take an un-rectified momentum step (True, as
            torch) or no step (False, as the official code's option).
        foreach, fused: implementation choice as in torch; ``None`` picks the fused
            (compiled) kernel where torch.compile works, else multi-tensor ops.
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq``; None: the parameter's (see AdaBound).
    """

    _kernel_name = "radam"

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                 degenerated_to_sgd: bool = True, *, foreach: bool | None = None,
                 fused: bool | None = None, state_dtype: torch.dtype | None = None):
        check_hparams(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_state_dtype(state_dtype)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay,
                        degenerated_to_sgd=degenerated_to_sgd, foreach=foreach, fused=fused,
                        state_dtype=state_dtype)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("degenerated_to_sgd", True)

    def _scalars(self, group: dict, step: float) -> list[float]:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        decoupled = group["decoupled_weight_decay"]
        bias_correction1 = 1.0 - beta1**step
        bias_correction2 = 1.0 - beta2**step
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * step * beta2**step / bias_correction2
        rectified = rho_t > RECTIFY_THRESHOLD
        moves = rectified or group["degenerated_to_sgd"]
        rect = 0.0
        if rectified:
            rect = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                             / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
        # [b1, 1-b1, b2, 1-b2, eps, coupled L2, decay factor, lr/bc1 (0: no move),
        #  r_t * sqrt(bc2), rectified flag]
        return [beta1, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"],
                0.0 if decoupled else wd, 1.0 - lr * wd if (decoupled and moves) else 1.0,
                lr / bias_correction1 if moves else 0.0,
                rect * math.sqrt(bias_correction2), 1.0 if rectified else 0.0]

    def _still(self, s: list[float]) -> list[float]:
        """Moments kept (lerp weight 0, beta2 1), no decay, no move."""
        return [1.0, 0.0, 1.0, 0.0, s[4], 0.0, 1.0, 0.0, s[8], s[9]]

    @staticmethod
    def _body(p, g, m, v, vmax, s):
        pf = p.float()  # float32 arithmetic whatever the storage
        g = g.float() + s[5] * pf
        m_new = torch.lerp(m.float(), g, s[1])  # torch.optim.RAdam's form of the EMA
        v_new = v.float() * s[2] + g * g * s[3]
        adaptive = torch.where(s[9] > 0, s[8] / (v_new.sqrt() + s[4]), 1.0)
        p.copy_(pf * s[6] - m_new * s[7] * adaptive)
        m.copy_(m_new)
        v.copy_(v_new)

    def _foreach_update(self, group, params, grads, exp_avgs, exp_avg_sqs, max_sqs, s):
        b1, c1, b2, c2, eps, l2, decay, step_on_m, rect_bc2, rectified = s
        if l2 != 0.0:
            grads = torch._foreach_add(grads, params, alpha=l2)
        if grads and grads[0].dtype != exp_avgs[0].dtype:  # bf16 weights, float32 state (state_dtype)
            grads = [g.to(exp_avgs[0].dtype) for g in grads]
        torch._foreach_lerp_(exp_avgs, grads, c1)
        torch._foreach_mul_(exp_avg_sqs, b2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=c2)
        if decay != 1.0:
            torch._foreach_mul_(params, decay)
        if step_on_m == 0.0:
            return
        if rectified:
            denom = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avgs, denom, value=-step_on_m * rect_bc2)
        else:
            torch._foreach_add_(params, exp_avgs, alpha=-step_on_m)

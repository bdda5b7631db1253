"""Model, data and the unsharded reference run shared by the sharding tests and their workers.

Every rank builds the same model from the same seed; the global batch of step ``t`` is drawn
from a generator seeded with ``t``, and rank ``r`` at micro step ``m`` takes rows
``[(m * world + r) * micro, ...)``: the mean over the equal chunks equals the full-batch mean.
"""

from __future__ import annotations

import copy

import torch

D_IN, D_HID, D_OUT = 8, 16, 4
HPARAMS = {
    "adabound": {"lr": 3e-3, "final_lr": 0.05, "gamma": 1e-2, "weight_decay": 1e-3, "foreach": True},
    "amsbound": {"lr": 3e-3, "final_lr": 0.05, "gamma": 1e-2, "weight_decay": 1e-3, "foreach": True},
    "radam": {"lr": 3e-3, "weight_decay": 1e-3, "foreach": True},
}
def ctor_hparams(opt: str) -> dict:
    """The tuned hyperparameters without implementation switches (what the scaling rules take)."""
    return {k: v for k, v in HPARAMS[opt].items() if k not in ("foreach", "fused")}


TYPE_NAMES = {"adabound": "AdaBound", "amsbound": "AMSBound", "radam": "RAdam"}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(D_IN, D_HID)
        self.fc2 = torch.nn.Linear(D_HID, D_HID)
        self.fc3 = torch.nn.Linear(D_HID, D_OUT)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def make_gpt2(seed: int = 0):
    """A 2-layer GPT-2 from a config (tied embeddings, causal-mask buffers; dropout off)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=101, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def token_batch(step: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randint(0, 101, (size, 16), generator=g)


def global_batch(step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, D_IN, generator=g)
    w = torch.linspace(-1, 1, D_IN * D_OUT).reshape(D_IN, D_OUT)
    y = torch.sin(x @ w) + 0.1 * torch.randn(size, D_OUT, generator=g)
    return x, y


def micro_batch(step: int, size: int, world: int, rank: int, micro: int, m: int):
    x, y = global_batch(step, size)
    lo = (m * world + rank) * micro
    return x[lo:lo + micro], y[lo:lo + micro]


def param_groups(model: torch.nn.Module, lr: float) -> list[dict]:
    """Two groups: weights (decay 1e-2, the default lr) and biases (no decay, twice the lr)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [{"params": weights, "weight_decay": 1e-2}, {"params": biases, "weight_decay": 0.0, "lr": 2 * lr}]


def warmup(optimizer):
    """Linear warmup over 12 steps then constant (a picklable callable for DeepSpeed)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_factor)


def _warmup_factor(step: int) -> float:
    return min(1.0, (step + 1) / 12)


def ds_config(opt: str, stage: int, global_bs: int, grad_accum: int, **extra) -> dict:
    cfg = {
        "train_batch_size": global_bs,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": TYPE_NAMES[opt], "params": dict(HPARAMS[opt])},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    cfg.update(extra)
    return cfg


def reference_run(opt: str, steps: int, size: int, *, groups: bool = True, scheduler: bool = True,
                  seed: int = 0) -> dict:
    """Unsharded single-process training on the full global batch: losses and final weights."""
    from bigbatch.optim import get_optimizer_class

    model = make_model(seed)
    hp = dict(HPARAMS[opt])
    params = param_groups(model, hp["lr"]) if groups else model.parameters()
    optim = get_optimizer_class(opt)(params, **hp)
    sched = warmup(optim) if scheduler else None
    losses = []
    for t in range(steps):
        x, y = global_batch(t, size)
        loss = torch.nn.functional.mse_loss(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return {"losses": losses, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "state": copy.deepcopy(optim.state_dict())}

"""The process's random-number states (Python, NumPy, torch, CUDA), as checkpoints keep them."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Plain data only (tuples, numbers, strings, tensors), so that a checkpoint loads with
    ``torch.load(weights_only=True)``: NumPy's key array is kept as an int64 tensor."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

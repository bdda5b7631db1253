"""Optimizers and batch-size scaling for large-batch training.

``AdaBound``, ``AMSBound`` and ``RAdam`` are torch optimizers exact to their papers' official
code, with a fused (compiled) single-pass update; ``get_optimizer_class`` resolves a name or a
class path.
"""

from bigbatch.optim.adabound import AdaBound, AMSBound
from bigbatch.optim.radam import RAdam
from bigbatch.optim.registry import OPTIMIZERS, canonical_name, get_optimizer_class

__all__ = ["AdaBound", "AMSBound", "RAdam", "OPTIMIZERS", "canonical_name", "get_optimizer_class"]

"""Optimizers: AdaBound, AMSBound and RAdam, exact to their papers' official code, with a fused
single-pass update (a C kernel on CPU, a compiled kernel elsewhere); the registry that resolves
an optimizer named by a string, a class path or a class. Batch-size scaling is
:mod:`bigbatch.scaling`.
"""

from bigbatch.optim.adabound import AdaBound, AMSBound
from bigbatch.optim.radam import RAdam
from bigbatch.optim.registry import OPTIMIZERS, canonical_name, get_optimizer_class

__all__ = ["AdaBound", "AMSBound", "RAdam", "OPTIMIZERS", "canonical_name", "get_optimizer_class"]

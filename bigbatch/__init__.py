"""bigbatch: large-batch Transformer pretraining.

Parts: ``bigbatch.optim`` (AdaBound, AMSBound, RAdam, batch-size scaling rules, gradient noise
scale), ``bigbatch.sharding`` (DeepSpeed ZeRO engines and resharding checkpoints) and
``bigbatch.launcher`` (SLURM, MPI, torchrun and deepspeed environments).
"""

__version__ = "0.1.0"

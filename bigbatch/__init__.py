"""bigbatch: large-batch Transformer pretraining.

Parts: ``bigbatch.optim`` (AdaBound, AMSBound, RAdam and their kernels; the optimizer registry),
``bigbatch.scaling`` (the batch-size scaling rules, the batch planner, schedules, the gradient noise
scale, SVAG, the memory and cost models), ``bigbatch.sharding`` (the engines: DeepSpeed ZeRO, FSDP2, DDP,
and checkpoints that reshard), ``bigbatch.data`` (corpora, tokenizers, packed blocks, prepare-data,
mixtures), ``bigbatch.training`` (the run config, the loop and its callbacks, export), ``bigbatch.launcher``
(SLURM, MPI, torchrun and deepspeed environments, submission), ``bigbatch.hf`` (the Hugging Face Trainer
and Accelerate), and the commands (``bigbatch.cli``, ``bigbatch.check_rules``).
"""

__version__ = "0.1.0"

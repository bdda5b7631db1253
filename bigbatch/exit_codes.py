"""Exit codes that train.py, the launcher and the sbatch templates agree on."""

#: bad input: a config, file, corpus or batch that cannot work (the message names it)
BAD_INPUT = 2
#: stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job with --resume
#: (EX_TEMPFAIL, "try again later")
PREEMPTED = 75

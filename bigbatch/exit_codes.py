"""Exit codes that train.py, the launcher and the sbatch templates agree on."""

#: bad input: a config, file, corpus or batch that cannot work (the message names it)
BAD_INPUT = 2
#: stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job with --resume
#: (EX_TEMPFAIL, "try again later")
PREEMPTED = 75
#: training stopped: too many optimizer steps in a row had non-finite gradients
NOT_FINITE = 3
#: a checkpoint could not be written (a full disk, an unwritable directory); the message names the file
SAVE_FAILED = 74
#: a rank made no progress within train.step_timeout_s, or a signal arrived while it was stuck
HUNG = 124
#: the batch schedule outgrew the nodes in hand and a larger allocation pays (scale_out policy): a
#: checkpoint is saved; the sbatch script submits the same command on more nodes, which resumes it
SCALE_OUT = 76

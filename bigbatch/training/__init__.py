"""The training job of ``train.py``: the run config (``config``), models from configs or a Hugging Face
directory (``model``, ``init_from``), builders of the plan, model and engine (``builders``), the loop and
its callbacks (``loop``, ``commands``, ``callbacks``, ``step_sync``, ``lr_control``, ``noise_meter``),
checkpoints (``checkpointer``), the run directory and its outputs (``run_dir``, ``metrics``,
``wandb_log``, ``watchdog``, ``status``), the plan before a run (``plan``, ``flops``), and what leaves a
run (``export``, ``evaluate``). Flow: file/CLI -> RunConfig -> builders -> engine -> loop."""

from bigbatch.logs import quiet_third_party

quiet_third_party()  # before any submodule imports DeepSpeed

"""Pretrain a causal language model with bigbatch.

    python train.py --config configs/tiny.yaml --out runs/tiny [--section.key VALUE ...]
    torchrun --standalone --nproc_per_node 2 train.py --config configs/tiny.yaml --out runs/tiny
    python train.py --resume runs/tiny [--section.key VALUE ...]   # latest good checkpoint, any world size

A resume runs on the run's saved config (config.resolved.yaml) with the overrides on top; --config
with --resume only starts a directory that holds no run yet (a requeue-safe command line).

Flow: YAML + overrides -> RunConfig -> tokenizer, packed data -> batch plan (global batch and
hyperparameters scaled from the reference batch), model, engine (DeepSpeed or FSDP2) -> training
loop with its callbacks (bigbatch.training). Outputs in --out: metrics.jsonl, config.resolved.yaml, checkpoints/,
tensorboard/, loss.png.

Exit codes: 0 finished; 2 bad input (config, files, corpus, batch); 75 (checkpoint.preempt_exit_code)
stopped by SIGTERM/SIGUSR1 after saving a checkpoint: requeue the job with --resume OUT (--resume on a
directory with no checkpoint yet starts from step 0, so a requeue script can always pass it). Under
torchrun the workers exit 75 but torchrun itself reports 1; the checkpoint is complete either way
(torchrun gives workers 30 s after forwarding SIGTERM before it kills them). 76 (scale_out policy):
the batch schedule outgrew these nodes; a checkpoint is saved: resume on more nodes (``bigbatch submit
--max-nodes`` does).
"""

from __future__ import annotations

import os
import sys

from bigbatch import distributed as bbdist
from bigbatch.cli_parser import command_main
from bigbatch.data.run_data import load_run_data
from bigbatch.training.builders import check_batch, setup
from bigbatch.training.callbacks import default_callbacks
from bigbatch.training.callbacks.scale_out import check_scale_out
from bigbatch.training.loop import Trainer
from bigbatch.training.plan import announce, check_peak
from bigbatch.training.run_dir import (has_checkpoint, parse_args, prepare, resolve_run,
                                      resume_config_note, save_model_files)


def main(argv=None) -> int:
    def body() -> int:
        args, overrides = parse_args(argv, __doc__)
        cfg, out, resuming = resolve_run(args.config, args.out, args.resume, args.overwrite, overrides)
        info = bbdist.init_training_process(cfg.train.threads, timeout_s=cfg.train.collective_timeout_s)
        check_batch(cfg, info.world_size)  # before any work
        notes = [n for n in (resume_config_note(args.config, args.resume), *cfg.notes()) if n]
        for note in notes if info.is_main else []:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        start = check_scale_out(cfg, info.world_size, info.local_world_size, fresh=not resuming)
        prepare(cfg, out, info, overwrite=args.overwrite, resuming=resuming)
        tok, data, corpus = load_run_data(cfg, info)
        planned = announce(cfg, info, len(tok), data.seq_len, global_batch=start)
        # a resume from a checkpoint takes its weights from there, never from model.init_from
        ckpt_dir = os.path.join(out, "checkpoints")
        run = setup(cfg, info.world_size, tok, data.seq_len, global_batch=start,
                    init_weights=not (resuming and has_checkpoint(ckpt_dir)))
        if info.is_main:
            save_model_files(out, tok, run.model.config)
        code = Trainer(cfg, out, info, data, corpus, run, callbacks=default_callbacks(cfg),
                       resume_from=ckpt_dir if resuming else None).run()
        if info.is_main:
            check_peak(planned)  # a warning when the run's peak memory was well above the plan's
        return code

    return command_main(body, teardown=bbdist.destroy)


if __name__ == "__main__":
    sys.exit(main())

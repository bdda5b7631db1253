"""``bigbatch eval DIR --tasks ...``: lm-evaluation-harness (``pip install 'bigbatch[eval]'``) on a Hugging
Face model directory, e.g. one ``bigbatch export`` wrote: its ``HFLM`` model class and
``simple_evaluate`` with a ``TaskManager`` that also reads the task YAMLs of ``--include-path``
(local tasks over local data files work offline)."""

from __future__ import annotations

import json
import os

from bigbatch import atomic
from bigbatch import distributed as bbdist
from bigbatch.cli_parser import ArgumentParser, command_main
from bigbatch.training.config import ConfigError


def evaluate(model_dir: str, tasks: list[str], *, include_path: str | None = None, limit: float | None = None,
             batch_size: int = 8, device: str = "cpu", num_fewshot: int | None = None) -> dict:
    """lm-eval's ``simple_evaluate`` of ``model_dir`` (float32) on ``tasks``: its result dict
    (``results[task][metric]``). Bad arguments raise a ConfigError naming them."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"DIR: {model_dir!r} is not a Hugging Face model directory (no config.json)")
    if include_path is not None and not os.path.exists(include_path):
        raise ConfigError(f"--include-path: {include_path!r} does not exist")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError("bigbatch eval needs lm-evaluation-harness, which is not installed; "
                          "pip install 'bigbatch[eval]'") from None
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown or not tasks:
        raise ConfigError(f"--tasks: {','.join(unknown or tasks)!r} unknown to lm-eval"
                          + ("" if include_path else " (local task YAMLs need --include-path)"))
    lm = HFLM(pretrained=model_dir, batch_size=batch_size, device=device, dtype="float32")
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                   num_fewshot=num_fewshot, log_samples=False)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="bigbatch eval", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", metavar="DIR", help="a Hugging Face model directory (bigbatch export's --out)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a directory of extra task YAMLs")
    p.add_argument("--limit", type=float, default=None, help="examples per task (or a fraction)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results JSON here")

    def body() -> int:
        args = p.parse_args(argv)
        tasks = [t for t in args.tasks.split(",") if t]
        result = evaluate(args.model_dir, tasks, include_path=args.include_path, limit=args.limit,
                          batch_size=args.batch_size, device=args.device, num_fewshot=args.num_fewshot)
        results = {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
                   for task, metrics in result["results"].items()}
        text = json.dumps(results, indent=1, sort_keys=True)
        if args.out:
            atomic.write_text(args.out, text + "\n")
        print(text, flush=True)
        return 0

    return command_main(body, teardown=bbdist.destroy)

"""Every command's bad input: exit 2 and one line naming the argument or key, before any work; and
the resume and requeue paths that would otherwise lose a run's history or fail on every requeue."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from bigbatch.cli import main as cli_main
from bigbatch.launcher.submit import SubmitConfig, render_sbatch
from bigbatch.training.config import ConfigError, dump_yaml, load_config
from bigbatch.training.builders import check_batch
from bigbatch.training.metrics import truncate_metrics
from bigbatch.training.run_dir import resolve_run
from train_common import REPO, main as train_main

CFG = str(REPO / "configs" / "tiny.yaml")
UNWRITABLE = "/proc/bigbatch-test"
# what DeepSpeed's first import in a process prints on any run (its accelerator guess; without libaio,
# its async-io probe's linker errors): not ours, and not the error line
DEEPSPEED_NOISE = ("[real_accelerator.py", "cannot find -laio", "collect2: error: ld returned")  # refuses new entries even for root (chmod does not stop root)


def _cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, text the one line must contain)."""
    f = tmp / "afile"
    f.write_text("")
    nope = str(tmp / "nope")
    check = ["check-rules", "--config", CFG, "--tokens", "60000"]
    sub = ["submit", "--dry-run", "--chdir", str(REPO)]
    train = ["train.py", "--config", CFG]
    return [
        ("train", ["--config", nope + ".yaml", "--out", str(tmp / "o")], "--config: file"),
        ("train", ["--resume", nope], "--resume:"),
        ("train", ["--config", CFG, "--out", str(f)], "--out: " + str(f)),
        ("train", ["--config", CFG, "--out", UNWRITABLE], "--out: " + UNWRITABLE),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--batch.schedule", "[[0,16],[20000,32"],
         "batch.schedule: '[[0,16],[20000,32' is not valid YAML"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--optim.hparams.lr", "-1"],
         "optim.hparams.lr: -1 is refused by AdaBound"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--optim.hparams.betas", "[1.5, 0.9]"],
         "optim.hparams.betas: [1.5, 0.9] is refused by AdaBound: Invalid beta1"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--batch.second_moment", "half"],
         "batch.second_moment: 'half'"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--batch.noise_lr", "maybe"],
         "batch.noise_lr: 'maybe' is not a boolean"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--batch.noise_lr", "true", "--train.noise_scale_every",
                   "0"], "batch.noise_lr: true moves the lr with the gradient noise scale"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--train.profile_steps", "[3, 2]"],
         "train.profile_steps: [3, 2] must be [first, last] steps with 1 <= first <= last"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--train.profile_steps", "4"],
         "train.profile_steps: [4] must be [first, last]"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--train.profile_steps", "[1.5, 2]"],
         "train.profile_steps[0]: 1.5 is not an integer"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--train.compile", "maybe"],
         "train.compile: 'maybe' is not a boolean"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--model.foo", "1"], "unknown key 'model.foo'"),
        ("train", ["--config", CFG, "--out", str(tmp / "o"), "--overwrite=yes"], "train.py: error:"),
        ("cli", [*check, "--out", nope, "--config", nope + ".yaml"], "--config: file"),
        ("cli", [*check, "--out", str(f)], "--out: " + str(f)),
        ("cli", [*check, "--out", UNWRITABLE], "--out: " + UNWRITABLE),
        ("cli", [*check, "--out", str(tmp / "c"), "--evals", "x"], "argument --evals: invalid int value"),
        ("cli", [*check, "--out", str(tmp / "c"), "--kappas", "0"], "--kappas: 0"),
        ("cli", [*check, "--out", str(tmp / "c"), "--kapas", "2"], "override '--kapas'"),
        ("cli", ["submit", "--dry-run", "--chdir", nope, "--", *train, "--out", str(tmp / "s")], "--chdir:"),
        ("cli", [*sub, "--", "train.py", "--config", nope + ".yaml", "--out", str(tmp / "s")], "--config: file"),
        ("cli", ["submit", "--dry-run", "--chdir", str(f), "--", *train, "--out", str(tmp / "s")], "--chdir:"),
        ("cli", [*sub, "--", *train, "--out", str(f)], "--out: " + str(f)),
        ("cli", [*sub, "--output", UNWRITABLE + "/x-%j.out", "--", *train, "--out", str(tmp / "s")], "--output:"),
        ("cli", [*sub, "--time", "1h", "--", *train, "--out", str(tmp / "s")], "--time: '1h'"),
        ("cli", [*sub, "--nodes", "two", "--", *train], "argument --nodes: invalid int value"),
        ("cli", [*sub, "--nodes", "0", "--", *train, "--out", str(tmp / "s")], "--nodes: 0 must be >= 1"),
        ("cli", [*sub, "--node", "2", "--", *train, "--out", str(tmp / "s")], "unrecognized arguments: --node"),
        ("cli", [*sub, "--", *train, "--out", str(tmp / "s"), "--optim.hparams.lr", "-1"], "optim.hparams.lr"),
        ("cli", ["launch", *train, "--out", str(f)], "--out: " + str(f)),
        ("cli", ["launch", *train, "--out", str(tmp / "l"), "--batch.schedule", "[[0,"], "not valid YAML"),
        ("cli", ["launch", "--nproc-per-node", "x", *train], "argument --nproc-per-node: invalid int value"),
        ("cli", ["launch", "--nproc-per-node", "0", *train, "--out", str(tmp / "l")], "--nproc-per-node: 0"),
        ("cli", ["launch", "--nprocs", "2", *train], "unrecognized arguments: --nprocs"),
        ("cli", ["launch"], "nothing to run"),
    ]


def test_bad_input_is_exit_2_and_one_line(tmp_path, capfd):
    """All the cases in this one process (fd-level capture: a launched worker's stderr counts too);
    nothing may be created besides what the case names."""
    failures = []
    for kind, argv, text in _cases(tmp_path):
        try:
            rc = train_main(argv) if kind == "train" else cli_main(argv)
        except SystemExit as exc:  # argparse
            rc = exc.code
        cap = capfd.readouterr()
        lines = [l for l in cap.err.splitlines() if l.strip() and not any(n in l for n in DEEPSPEED_NOISE)]
        if rc != 2 or len(lines) != 1 or text not in lines[0]:
            failures.append(f"{kind} {argv}: exit {rc}, stderr {lines}")
    assert not failures, "\n".join(failures)
    assert not any((tmp_path / d).exists() for d in ("o", "c", "s", "l")), list(tmp_path.iterdir())


@pytest.mark.slow
def test_launch_of_a_missing_script_is_one_line(tmp_path, capfd):
    """The worker's own interpreter says it (python exits 2 with one line)."""
    assert cli_main(["launch", str(tmp_path / "nope.py")]) == 2
    lines = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and "can't open file" in lines[0], lines


def test_scaled_betas_name_the_hparam_and_the_batch():
    cfg = load_config(CFG, ["--batch.global_batch", "256"])  # kappa 16: 1 - 16 x 0.1 < 0
    with pytest.raises(ConfigError, match=r"^optim\.hparams\.betas and batch\.\*: beta1=0.9 at kappa=16"):
        check_batch(cfg, 1)
    cfg = load_config(CFG, ["--batch.schedule", "[[0, 16], [1000, 512]]"])
    with pytest.raises(ConfigError, match=r"^optim\.hparams\.betas and batch\.schedule\[1\]: \[1000, 512\]"):
        check_batch(cfg, 1)


def test_notes_shrinking_schedule_and_deepspeed_under_fsdp2():
    assert load_config(CFG).notes() == []
    notes = load_config(CFG, ["--batch.schedule", "[[0, 32], [20000, 16]]", "--train.engine", "fsdp2"]).notes()
    assert notes[0].startswith("batch.schedule[1]: [20000, 16] shrinks the global batch from 32")
    assert notes[1].startswith("deepspeed.zero_stage, deepspeed.precision: ignored, train.engine is 'fsdp2'")
    assert load_config(CFG, ["--batch.schedule", "[[0, 16], [20000, 32]]"]).notes() == []


def _old_run(tmp: Path, last_step: int) -> Path:
    run = tmp / "run"
    (run / "checkpoints").mkdir(parents=True)
    dump_yaml(load_config(CFG).to_dict(), run / "config.resolved.yaml")
    recs = [{"kind": "train", "step": s, "loss": 5.0} for s in range(1, last_step + 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_resume_runs_on_the_saved_config_and_says_so(tmp_path):
    """``--config C --resume DIR`` (the requeue-safe command): C starts a directory that holds no run;
    once DIR holds one, its saved config is used (overrides on top), never C, and the note says so."""
    from bigbatch.training.run_dir import resume_config_note

    run = tmp_path / "run"
    other = tmp_path / "other.yaml"
    dump_yaml({**load_config(CFG).to_dict(), "model": {"hidden_size": 64}}, other)
    cfg, _, resuming = resolve_run(str(other), None, str(run), False, [])
    assert resuming and cfg.model.hidden_size == 64 and resume_config_note(str(other), str(run)) is None
    run = _old_run(tmp_path, 0)  # saved: the tiny config, hidden size 128
    cfg, _, _ = resolve_run(str(other), None, str(run), False, [("train.seed", "7")])
    assert cfg.model.hidden_size == 128 and cfg.train.seed == 7
    note = resume_config_note(str(other), str(run))
    assert note.startswith(f"--resume: {run} continues on its saved config (config.resolved.yaml); --config {other}")


def test_resume_without_checkpoints_keeps_history(tmp_path):
    """checkpoints/ emptied after steps were logged: --resume refuses (naming both), unless
    checkpoint.if_unusable restart, which then keeps the old metrics aside; a requeue before the
    first save (nothing logged past step 0) starts fresh."""
    run = _old_run(tmp_path, 5)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"^--resume: .* logged steps up to 5 but .*checkpoints has no complete "
                                          r"checkpoint \(none there\).*--checkpoint.if_unusable restart"):
        resolve_run(None, None, str(run), False, [])
    (run / "checkpoints").rmdir()  # deleted, not only emptied
    with pytest.raises(ConfigError, match="logged steps up to 5"):
        resolve_run(None, None, str(run), False, [])
    cfg, out, resuming = resolve_run(None, None, str(run), False, [("checkpoint.if_unusable", "restart")])
    assert resuming and out == str(run)
    truncate_metrics(str(run / "metrics.jsonl"), 0)  # what the loop does on a start from step 0
    aside = [p for p in run.iterdir() if p.name.startswith("metrics.jsonl.")]
    assert len(aside) == 1 and aside[0].read_text() == before and not (run / "metrics.jsonl").exists()
    fresh = _old_run(tmp_path / "b", 0)
    assert resolve_run(None, None, str(fresh), False, [])[2]


@pytest.mark.slow
def test_train_resume_after_checkpoints_deleted(tmp_path, cache):
    """End to end (train.py processes): 2 steps with a checkpoint, checkpoints/ deleted, --resume exits 2 with one line and
    leaves metrics.jsonl as it was; with --checkpoint.if_unusable restart it trains from step 1 and
    the first history is in metrics.jsonl.<time>."""
    import shutil

    from train_common import PY, check_ok, run, small_args

    out = tmp_path / "run"
    check_ok(run([PY, "train.py", "--config", CFG, "--out", str(out), *small_args(cache), "--train.max_steps", "2",
                  "--train.eval_every", "0", "--logging.plot", "false", "--logging.tensorboard", "false"]))
    history = (out / "metrics.jsonl").read_text()
    shutil.rmtree(out / "checkpoints")
    proc = run([PY, "train.py", "--resume", str(out)])
    errors = [l for l in proc.stderr.splitlines() if l.strip() and not any(n in l for n in DEEPSPEED_NOISE)]
    assert proc.returncode == 2 and len(errors) == 1 and "logged steps up to 2" in errors[0], proc.stderr
    assert (out / "metrics.jsonl").read_text() == history
    check_ok(run([PY, "train.py", "--resume", str(out), "--checkpoint.if_unusable", "restart",
                  "--train.max_steps", "1"]))
    aside = [p for p in out.iterdir() if p.name.startswith("metrics.jsonl.")]
    assert len(aside) == 1 and aside[0].read_text() == history
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == [1]


def test_submit_turns_out_into_resume_on_requeue(tmp_path, capfd):
    """A requeueing job of train.py --out D runs --out D first and --resume D on every requeue (bash
    really run with both SLURM_RESTART_COUNT values); the defaults it chose are said once."""
    assert cli_main(["submit", "--dry-run", "--chdir", str(REPO), "--time", "10", "--",
                     "train.py", "--config", CFG, "--out", str(tmp_path / "r"), "--train.max_steps", "3"]) == 0
    cap = capfd.readouterr()
    notes = cap.err.strip().splitlines()
    assert len(notes) == 3 and notes[0].startswith("bigbatch submit: defaults used: --cpus-per-task 1,"), notes
    assert notes[2].startswith("bigbatch submit: plan: ") and "on 1 process: " in notes[2], notes
    assert "--time" not in notes[0] and f"--resume {tmp_path / 'r'} on every requeue" in notes[1], notes
    script = cap.out
    assert '"$run_dir_opt" ' + str(tmp_path / "r") in script
    # the line that picks the option, run by bash
    pick = "\n".join(l for l in script.splitlines() if "run_dir_opt" in l and not l.startswith(("srun", "#")))
    for count, opt in (("0", "--out"), ("1", "--resume"), ("3", "--resume")):
        got = subprocess.run(["bash", "-c", f'set -u; {pick}\necho "$run_dir_opt"'], capture_output=True, text=True,
                             env={**os.environ, "SLURM_RESTART_COUNT": count}).stdout.strip()
        assert got == opt, (count, got)
    # the job a scale-out submits (a new job: restart count 0) continues the run too
    got = subprocess.run(["bash", "-c", f'set -u; {pick}\necho "$run_dir_opt"'], capture_output=True, text=True,
                         env={**os.environ, "SLURM_RESTART_COUNT": "0", "BIGBATCH_CONTINUES": "1"}).stdout.strip()
    assert got == "--resume"
    # --resume already, no requeue, or not train.py: left as given
    for cfg in (SubmitConfig(command=["train.py", "--resume", "r"]),
                SubmitConfig(command=["train.py", "--config", "c", "--out", "r"], requeue=False),
                SubmitConfig(command=["-m", "pkg", "--out", "r"])):
        assert "run_dir_opt" not in render_sbatch(cfg)
    script = render_sbatch(SubmitConfig(command=["train.py", "--out=r", "--x.y", "1"], template="torchrun"))
    assert 'train.py "$run_dir_opt" r --x.y 1 &' in script
    path = tmp_path / "t.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


class Planted:
    """A pickle that creates a directory when it is loaded: a stand-in for any code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_sharded_checkpoint_files_never_run_code(tmp_path):
    """FSDP2's DCP files: ``.metadata`` is a plain pickle and non-tensor entries are pickled; both are
    refused, naming the file, when they would call anything (DCP's own reader would run them)."""
    import pickle
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp

    from bigbatch.sharding import tags
    from bigbatch.sharding.full_state import read_dcp

    good = {"model": {"w": torch.ones(2)}, "optim": {"param_groups": [{"lr": 0.1, "params": ["w"]}]}}
    dcp.save(good, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    assert read_dcp(str(tmp_path / "ok"))["optim"] == good["optim"]
    dcp.save({"model": {"w": torch.ones(2)}, "optim": {"x": Planted(str(tmp_path / "m1"))}},
             checkpoint_id=str(tmp_path / "entry"), no_dist=True)
    with pytest.raises(tags.CheckpointError, match=r"/entry \(entry optim.x\): refused, loading it would run code") as exc:
        read_dcp(str(tmp_path / "entry"))
    assert exc.type.__name__ == "UnsafeCheckpoint"  # never passed over for an older tag
    shutil.copytree(tmp_path / "ok", tmp_path / "meta")
    metadata = tmp_path / "meta" / ".metadata"
    md = pickle.loads(metadata.read_bytes())
    md.planted = Planted(str(tmp_path / "m2"))
    metadata.write_bytes(pickle.dumps(md))
    with pytest.raises(tags.CheckpointError, match=rf"{metadata}: refused, loading it would run code .*mkdir"):
        read_dcp(str(tmp_path / "meta"))
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_third_party_noise_is_filtered_unless_debug():
    """DeepSpeed's accelerator guess and torch's deprecation warnings for DeepSpeed's collectives say
    nothing to a user: not printed once bigbatch.training is imported; BIGBATCH_LOG_LEVEL=debug keeps them."""
    import sys

    code = ("import warnings, bigbatch.training.builders\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "get_accelerator()\n"
            "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated', FutureWarning)\n"
            "print('done')\n")
    env = {k: v for k, v in os.environ.items() if k != "BIGBATCH_LOG_LEVEL"}
    for level, shown in [(None, False), ("debug", True)]:
        e = {**env, "BIGBATCH_LOG_LEVEL": level} if level else env
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True, text=True,
                              timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "done" in out, out
        assert ("Setting accelerator to CPU" in out) == shown, (level, out)
        assert ("all_gather_into_tensor` is deprecated" in out) == shown, (level, out)

"""Repeat the tests that send a signal, kill a process or poison a step, to find any whose outcome
depends on timing: every such test waits for a known point of the run before its fault lands
(tests/fault/, tests/dist_probe.py --wait-at), so every round must pass, on an idle machine and on
a loaded one.

Each round runs pytest once per test file on that file's fault tests (``-k``), reads the outcome of
every test from pytest's JUnit XML, and the end reports passes and failures per test (with the first
line of each failure). ``--load``: one busy loop per core at the lowest priority (``nice -n 19``) for
the whole time, so that the tests run on a loaded machine. The SLURM tests start and stop the test
cluster (tests/conftest.py) in each round. Exit status 1 when a test failed.

    python benchmarks/fault_repeat.py [--repeat 5] [--load] [--files tests/test_train.py ...] [-k EXPR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# file: the tests in it that send a signal, stop or kill a process, or poison a step
FAULT_TESTS = {
    "tests/test_train.py": ["test_sigterm_saves_and_resume_on_two_processes_continues_exactly"],
    "tests/test_launcher.py": ["test_launch_local_preempt_resume_rescale"],
    "tests/test_prepare.py": ["test_killed_prepare_restarts_to_the_same_bytes"],
    "tests/test_reliability.py": [
        "test_nan_step_changes_no_state_and_the_run_continues",
        "test_too_many_non_finite_steps_in_a_row_stop_the_run",
        "test_a_stopped_rank_ends_the_job_within_the_timeout",
        "test_a_killed_rank_ends_the_job",
        "test_a_signal_while_a_rank_is_stuck_ends_promptly_and_says_so",
        "test_a_kill_during_a_background_save_leaves_latest_on_the_previous_tag",
    ],
    "tests/test_slurm.py": [
        "test_preempt_signal_checkpoint_requeue_finish",
        "test_cancel_does_not_requeue",
        "test_train_two_nodes_preempt_requeue_then_resume_on_one_node",
        "test_train_out_survives_its_own_requeue",
    ],
    "tests/test_scale_out.py": ["test_requeue_on_fewer_nodes_cuts_the_batch_by_the_rules"],
}


def start_load() -> list[subprocess.Popen]:
    """One busy loop per core at the lowest priority."""
    return [subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"])
            for _ in range(os.cpu_count() or 1)]


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def run_file(path: str, names: list[str], extra_k: str | None, xml: Path) -> dict[str, tuple[str, str]]:
    """{test name: (outcome, first line of the failure)} of one pytest run of ``names`` in ``path``."""
    k = " or ".join(names)
    if extra_k:
        k = f"({k}) and ({extra_k})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pytest", path, "-q", "-k", k, "-p", "no:cacheprovider",
                           f"--junitxml={xml}"], cwd=REPO, env=env, capture_output=True, text=True)
    results: dict[str, tuple[str, str]] = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, why = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    why = ((node.get("message") or node.text or "").strip().splitlines() or [""])[0][:200]
                    break
            results[case.get("name")] = (outcome, why)
    if not results:  # pytest itself failed (collection, usage): every selected test counts as failed
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
        results = {n: ("failed", f"pytest exit {proc.returncode}: {tail[0][:200]}") for n in names}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5, help="rounds (each runs every selected test once)")
    p.add_argument("--load", action="store_true", help="a lowest-priority busy loop on every core meanwhile")
    p.add_argument("--files", nargs="+", default=list(FAULT_TESTS), help="test files (of FAULT_TESTS) to run")
    p.add_argument("-k", dest="k", default=None, help="a further pytest -k expression")
    args = p.parse_args(argv)
    unknown = [f for f in args.files if f not in FAULT_TESTS]
    if unknown or args.repeat < 1:
        print(f"error: --files: {unknown} not among {list(FAULT_TESTS)}" if unknown
              else f"error: --repeat: {args.repeat} must be >= 1", file=sys.stderr)
        return 2
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    reasons: dict[str, list[str]] = defaultdict(list)
    load = start_load() if args.load else []
    t0 = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="fault_repeat_") as tmp:
            for r in range(args.repeat):
                for f in args.files:
                    xml = Path(tmp) / f"r{r}_{Path(f).stem}.xml"
                    for name, (outcome, why) in run_file(f, FAULT_TESTS[f], args.k, xml).items():
                        counts[f"{f}::{name}"][outcome] += 1
                        if outcome == "failed":
                            reasons[f"{f}::{name}"].append(f"round {r + 1}: {why}")
                        print(f"[round {r + 1}/{args.repeat}] {outcome:7s} {f}::{name}", flush=True)
    finally:
        stop_load(load)
    print(f"\n{args.repeat} round(s){' under load' if args.load else ''} in {time.monotonic() - t0:.0f} s")
    print(f"{'passed':>6} {'failed':>6} {'skipped':>7}  test")
    for test, c in sorted(counts.items()):
        print(f"{c['passed']:6d} {c['failed']:6d} {c['skipped']:7d}  {test}")
        for line in reasons.get(test, []):
            print(f"{'':22s}{line}")
    return 1 if any(c["failed"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

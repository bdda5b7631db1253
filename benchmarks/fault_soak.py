"""Fault soak: a 2-process train.py run under the local two-node SLURM cluster, hit by faults at
random steps, must end where an uninterrupted run of the same config ends.

The run (configs/tiny.yaml shrunk to the tests' tiny sizes, ``--steps`` optimizer steps, a
checkpoint every ``--every`` steps, 2 nodes x 1 rank, ``bigbatch submit`` with requeue) gets
``--faults`` faults at steps drawn by a seeded RNG, each kind at least once:

* ``kill``: SIGKILL to one rank. The job ends without a requeue (the sbatch script requeues only on
  the preemption exit code), so the same command is submitted again with ``--resume``, as a user would.
* ``usr1``: ``scancel --signal=USR1 --batch``: checkpoint, exit 75, the job requeues itself (released
  at once instead of SLURM's ~120 s hold).
* ``term``: ``scancel --signal=TERM --batch``: checkpoint, exit 75, no requeue (a TERM may be a
  cancel); submitted again with ``--resume``.
* ``corrupt``: stopped as ``usr1``; while the job waits in the queue one byte of a file of the newest
  tag is flipped: the resume must refuse it (content hash) and take the previous tag.
* ``disk_full``: stopped as ``usr1``; the run's ``checkpoints/`` (a small tmpfs of its own) is filled
  up to a few KiB before the release: the next periodic save fails (ENOSPC, exit 74), the failed tag
  must be gone; the filler is removed and the run submitted again with ``--resume``.

Each resume must start from the tag expected (the newest complete one; the one before it after a
corruption). The uninterrupted reference runs under SLURM as well (same template, same 2 ranks,
same config, started first; the soak starts once it has built the data cache). Checks: final eval loss
of both runs within 1e-6 relative, every train step logged exactly once in the soak's
``metrics.jsonl``, every fault handled as expected; the exit status is 1 when one fails.

Needs root (the cluster's daemons, the tmpfs mount) and the SLURM packages
(``bash scripts/slurm_cluster.sh install``). Takes the cluster lock ``/tmp/bigbatch-slurm.lock``;
starts the cluster unless it is up, and stops it at the end if it started it.

    python benchmarks/fault_soak.py [--steps 400 --faults 8 --seed 0] [--every 10] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bigbatch.sharding import tags  # noqa: E402

SLURM_DIR = os.environ.get("BIGBATCH_SLURM_DIR", "/tmp/bigbatch-slurm")
LOCK = "/tmp/bigbatch-slurm.lock"
KINDS = ("kill", "usr1", "term", "corrupt", "disk_full")
ENV = {**os.environ, "BIGBATCH_SLURM_DIR": SLURM_DIR, "SLURM_CONF": f"{SLURM_DIR}/slurm.conf",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TOKENS_PER_STEP = 8 * 64  # global batch 8 x seq_len 64
TIMEOUT = 600.0  # s, any single wait


class SoakError(RuntimeError):
    """Something the soak waited for did not happen; the message says what, with the job's log tail."""


def train_args(cache: str, steps: int, every: int) -> list[str]:
    """configs/tiny.yaml at the tests' tiny sizes (tests/train_common.small_args), ``steps`` steps."""
    return ["--config", "configs/tiny.yaml", "--data.cache_dir", cache, "--data.embedded", "pydoc",
            "--data.max_chars", "300000", "--tokenizer.vocab_size", "512", "--data.seq_len", "64",
            "--model.hidden_size", "32", "--model.intermediate_size", "64", "--model.num_heads", "2",
            "--train.log_every", "1", "--train.eval_every", "100", "--train.eval_blocks", "16",
            "--batch.reference_global_batch", "8", "--batch.micro_batch_sizes", "4",
            "--train.tokens", str(steps * TOKENS_PER_STEP), "--schedule.warmup_tokens", "0",
            "--optim.hparams.lr", "1e-2", "--optim.hparams.final_lr", "0.1", "--train.threads", "1",
            "--logging.progress", "lines", "--logging.tensorboard", "false", "--logging.plot", "false",
            "--checkpoint.every_steps", str(every)]


def sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    if check and proc.returncode != 0:
        raise SoakError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def wait_for(what: str, predicate, timeout: float = TIMEOUT, log: "Segment | None" = None):
    """Poll ``predicate()`` until it returns something truthy; SoakError naming ``what`` otherwise."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SoakError(f"{what}: not after {timeout:.0f} s" + (f"\n{log.tail()}" if log else ""))


# ---------------------------------------------------------------- the cluster and its jobs


def job_info(job: str) -> dict[str, str]:
    """``scontrol show job`` fields; {} once the job has left slurmctld."""
    proc = sh("scontrol", "show", "job", "-o", job, check=False)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def job_over(job: str) -> bool:
    info = job_info(job)
    return not info or info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


@dataclass
class Segment:
    """One start of a job: its log from ``offset`` on (a requeued job appends to the same file)."""

    job: str
    log_path: Path
    offset: int = 0

    def text(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, errors="replace") as fh:
            fh.seek(self.offset)
            return fh.read()

    def tail(self, n: int = 25) -> str:
        return f"--- job {self.job} log:\n" + "\n".join(self.text().splitlines()[-n:])

    def start_step(self) -> int:
        """The step this start continued from (train.py's header line), waiting for it."""
        def found():
            m = re.search(r"\| steps (\d+)->\d+ \|", self.text())
            if m is None and job_over(self.job):
                raise SoakError(f"job {self.job} ended before training started\n{self.tail()}")
            return m
        return int(wait_for(f"job {self.job} starting", found, log=self).group(1))

    def exit_status(self) -> int:
        """The workers' exit status as the sbatch script printed it (waits for the job to end)."""
        wait_for(f"job {self.job} ending", lambda: job_over(self.job) or "requeueing job" in self.text(), log=self)
        m = wait_for(f"job {self.job}'s exit status",
                     lambda: re.search(r"workers exited with status (\d+)", self.text()), timeout=30, log=self)
        return int(m.group(1))


def submit(work: Path, command: list[str]) -> Segment:
    """``bigbatch submit`` on 2 nodes x 1 rank, requeue on (the default)."""
    proc = sh(sys.executable, "-m", "bigbatch.cli", "submit", "--nodes", "2", "--ntasks-per-node", "1",
              "--time", "60", "--chdir", str(REPO), "--output", str(work / "slurm-%j.out"), "--",
              "train.py", *command)
    job = proc.stdout.strip()
    if not job.isdigit():
        raise SoakError(f"bigbatch submit printed no job id: {proc.stdout}{proc.stderr}")
    return Segment(job, work / f"slurm-{job}.out")


def release_requeued(seg: Segment, before_release=None) -> Segment:
    """Wait for the requeued job to be held in the queue, run ``before_release()``, then start it at
    once (SLURM holds a requeued job ~120 s). Released in the same second as the old run's end, a new
    launch is refused ("Job credential revoked"): wait for the nodes to finish completing, and 2 s."""
    def held():
        info = job_info(seg.job)
        if not info:
            raise SoakError(f"job {seg.job} ended instead of requeueing\n{seg.tail()}")
        return info.get("JobState") == "PENDING"  # called once the script said it requeues
    wait_for(f"job {seg.job} requeued", held, log=seg)
    nxt = Segment(seg.job, seg.log_path, seg.log_path.stat().st_size)
    if before_release is not None:
        before_release()
    time.sleep(2.0)
    wait_for("nodes done completing", lambda: not sh("sinfo", "-h", "-t", "completing", "-o", "%N").stdout.strip())
    sh("scontrol", "update", f"JobId={seg.job}", "StartTime=now", check=False)
    return nxt


def rank_pids(job: str) -> dict[int, int]:
    """{rank: pid} of the job's train.py workers (their parent is slurmstepd, not another worker)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
            if not os.path.basename(argv[0]).startswith(b"python") or not any(a.endswith(b"train.py") for a in argv):
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
            parent = (Path("/proc") / (d / "stat").read_text().rsplit(")", 1)[1].split()[1] / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and b"SLURM_PROCID" in env and b"train.py" not in parent:
            found[int(env[b"SLURM_PROCID"])] = int(d.name)
    return found


# ---------------------------------------------------------------- the run directory


def train_steps(run: Path) -> list[int]:
    steps = []
    path = run / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return steps


def final_eval_loss(run: Path) -> float:
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r.get("kind") == "eval"]
    return evals[-1]["eval_loss"]


def complete_tags(ckpt: Path) -> list[str]:
    """Tags with a manifest, oldest first."""
    return [t.tag for t in tags.scan(str(ckpt)) if t.complete]


def saved_at(ckpt: Path, tag: str) -> float:
    return tags.read_manifest(str(ckpt), tag)["saved_at"]


def tag_step(tag: str) -> int:
    return int(tag.removeprefix("step"))


def flip_byte(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def fill(mount: Path, leave: int) -> Path:
    """A file that leaves ``leave`` bytes free on ``mount``'s file system."""
    st = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, st.f_bavail * st.f_frsize - leave)
    return filler


# ---------------------------------------------------------------- faults


@dataclass
class Fault:
    step: int  # drawn; the fault hits the first step logged at or after it
    kind: str
    hit: int = 0  # last step logged when it hit
    exit: str = ""
    what: str = ""
    expected: int = -1  # step of the tag the resume must take
    resumed: int = -1
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def plan_faults(rng: random.Random, n: int, steps: int, every: int) -> list[Fault]:
    """``n`` faults at distinct steps past the second checkpoint and ``4 x every`` steps before the end (the
    run must still be going when the soak, polling the metrics, sees the step), each kind at least once
    (when ``n`` allows)."""
    kinds = list(KINDS[:n]) + rng.choices(KINDS, k=max(0, n - len(KINDS)))
    rng.shuffle(kinds)
    at = sorted(rng.sample(range(2 * every + 1, steps - 4 * every), n))
    return [Fault(s, k) for s, k in zip(at, kinds)]


class Soak:
    """The faulted run: its directory, its current job segment, and one method per fault kind."""

    def __init__(self, work: Path, command: list[str], every: int, rng: random.Random):
        self.work, self.every, self.rng = work, every, rng
        self.run = work / "soak"
        self.ckpt = self.run / "checkpoints"
        self.bad: dict[str, float] = {}  # tags this soak corrupted: their manifest's saved_at
        self.seg = submit(work, [*command, "--out", str(self.run)])

    def good_tags(self) -> list[str]:
        """Complete tags, oldest first, less those this soak corrupted (unless saved again since)."""
        return [t for t in complete_tags(self.ckpt) if self.bad.get(t) != saved_at(self.ckpt, t)]

    def resubmit(self) -> Segment:
        return submit(self.work, ["--resume", str(self.run)])

    def wait_step(self, step: int) -> int:
        """Wait until this segment logs ``step`` (or a later one); the last step logged."""
        self.seg.start_step()  # metrics.jsonl is cut back to the resumed step by then
        def reached():
            steps = train_steps(self.run)
            if steps and steps[-1] >= step:
                return steps[-1]
            if job_over(self.seg.job):
                raise SoakError(f"job {self.seg.job} ended before step {step}\n{self.seg.tail()}")
            return 0
        return wait_for(f"step {step}", reached, log=self.seg)

    def hit(self, fault: Fault) -> None:
        fault.hit = self.wait_step(fault.step)
        getattr(self, fault.kind)(fault)
        fault.resumed = self.seg.start_step()
        fault.expect(fault.resumed == fault.expected,
                     f"resumed at step {fault.resumed}, expected the tag of step {fault.expected}")
        if fault.kind in ("usr1", "term"):
            fault.expect(fault.resumed >= fault.hit, f"no checkpoint on the signal: resumed at step {fault.resumed}, "
                         f"before step {fault.hit} when it came")

    def kill(self, fault: Fault) -> None:
        pids = wait_for(f"job {self.seg.job}'s 2 ranks", lambda: (lambda p: len(p) == 2 and p)(rank_pids(self.seg.job)))
        rank = self.rng.choice(sorted(pids))
        os.kill(pids[rank], signal.SIGKILL)
        status = self.seg.exit_status()
        fault.exit = f"rank {rank} SIGKILL -> workers {status}"
        fault.expect(status not in (0, 75), f"workers exited {status} after a SIGKILL")
        fault.expect("requeueing job" not in self.seg.text(), "the job requeued after a SIGKILL")
        wait_for(f"job {self.seg.job} gone", lambda: job_over(self.seg.job))
        fault.expected = tag_step(self.good_tags()[-1])
        fault.what = "job ended, resubmitted with --resume"
        self.seg = self.resubmit()

    def _preempt(self, fault: Fault, before_release=None) -> None:
        sh("scancel", "--signal=USR1", "--batch", self.seg.job)
        status = self.seg.exit_status()
        fault.exit = f"workers {status}"
        fault.expect(status == 75, f"workers exited {status} after USR1, expected 75")
        old = self.seg
        self.seg = release_requeued(old, before_release)
        fault.expect("requeueing job" in old.text(), "the job did not requeue itself after USR1")

    def usr1(self, fault: Fault) -> None:
        def note():
            fault.expected = tag_step(self.good_tags()[-1])
        self._preempt(fault, note)
        fault.what = "checkpoint, requeued, released"

    def term(self, fault: Fault) -> None:
        sh("scancel", "--signal=TERM", "--batch", self.seg.job)
        status = self.seg.exit_status()
        fault.exit = f"workers {status}"
        fault.expect(status == 75, f"workers exited {status} after TERM, expected 75")
        fault.expect("requeueing job" not in self.seg.text(), "the job requeued after TERM")
        wait_for(f"job {self.seg.job} gone", lambda: job_over(self.seg.job))
        fault.expected = tag_step(self.good_tags()[-1])
        fault.what = "job ended (no requeue after a TERM), resubmitted with --resume"
        self.seg = self.resubmit()

    def corrupt(self, fault: Fault) -> None:
        bad = {}
        def flip():
            newest, previous = self.good_tags()[-2:][::-1]
            listed = tags.read_manifest(str(self.ckpt), newest)["files"]
            name = max(listed, key=lambda f: listed[f]["bytes"])
            flip_byte(self.ckpt / newest / name)
            bad.update(tag=newest, file=name)
            self.bad[newest] = saved_at(self.ckpt, newest)
            fault.expected = tag_step(previous)
        self._preempt(fault, flip)
        self.seg.start_step()  # the tags passed over are logged before train.py's header line
        passed = re.search(r"passed over: .*", self.seg.text())
        fault.expect(passed is not None and bad["tag"] in passed.group(0) and "hash" in passed.group(0),
                     f"no 'passed over' line naming {bad['tag']}'s hash")
        fault.what = f"flipped a byte of {bad['tag']}/{bad['file']} while queued; refused: hash"

    def disk_full(self, fault: Fault) -> None:
        filler: list[Path] = []
        def fill_up():
            fault.expected = tag_step(self.good_tags()[-1])
            filler.append(fill(self.ckpt, leave=8 << 10))
        self._preempt(fault, fill_up)
        start = self.seg.start_step()
        fault.expect(start == fault.expected, f"resumed onto the full disk at step {start}, expected {fault.expected}")
        failed_tag = f"step{(start // self.every + 1) * self.every:08d}"
        status = self.seg.exit_status()
        fault.expect(status == 74, f"the save on a full disk exited {status}, expected 74")
        fault.expect(not (self.ckpt / failed_tag).exists(), f"the failed save left {failed_tag}")
        fault.expect(tags.read_latest(str(self.ckpt)) == f"step{fault.expected:08d}",
                     "latest does not name the last good tag after the failed save")
        wait_for(f"job {self.seg.job} gone", lambda: job_over(self.seg.job))
        filler[0].unlink()
        fault.exit += f"; save of {failed_tag} on the full disk: workers {status}"
        fault.what = "disk filled while queued; failed tag removed; filler removed, resubmitted with --resume"
        self.seg = self.resubmit()


# ---------------------------------------------------------------- the soak


def cluster_up() -> bool:
    """Start the cluster unless it runs; whether this call started it."""
    pid = Path(SLURM_DIR, "run", "slurmctld.pid")
    try:
        os.kill(int(pid.read_text()), 0)
        return False
    except (OSError, ValueError):
        pass
    sh("bash", "scripts/slurm_cluster.sh", "up")
    return True


def step_report(run: Path, steps: int) -> tuple[int, list[int], list[int]]:
    """(train records, duplicated steps, missing steps) of ``run``'s metrics.jsonl."""
    logged = train_steps(run)
    seen = set()
    dup = sorted({s for s in logged if s in seen or seen.add(s)})
    return len(logged), dup, sorted(set(range(1, steps + 1)) - seen)


def soak(args, work: Path) -> bool:
    rng = random.Random(args.seed)
    faults = plan_faults(rng, args.faults, args.steps, args.every)
    print(f"fault soak: seed {args.seed}, {args.steps} steps, checkpoint every {args.every}, 2 nodes x 1 rank, "
          f"work dir {work}", flush=True)
    print("faults drawn: " + ", ".join(f"{f.kind}@{f.step}" for f in faults), flush=True)
    command = train_args(str(work / "cache"), args.steps, args.every)
    run = work / "soak"
    (run / "checkpoints").mkdir(parents=True)  # an empty directory: --out accepts it
    sh("mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mb}m", "tmpfs", str(run / "checkpoints"))
    jobs = []
    try:
        t0 = time.monotonic()
        ref = submit(work, [*command, "--out", str(work / "reference")])
        jobs.append(ref.job)
        ref.start_step()  # the data cache is built: the soak shares it
        t1 = time.monotonic()
        s = Soak(work, command, args.every, rng)
        jobs.append(s.seg.job)
        for i, fault in enumerate(faults, 1):
            s.hit(fault)
            jobs.append(s.seg.job)
            print(f"fault {i}: {fault.kind} at step {fault.hit} (drawn {fault.step}): {fault.exit}; {fault.what}; "
                  f"resumed from step{fault.resumed:08d}" + (f"  PROBLEM: {'; '.join(fault.problems)}"
                                                             if fault.problems else ""), flush=True)
        soak_status = s.seg.exit_status()
        soak_wall = time.monotonic() - t1
        ref_status = ref.exit_status()
        all_wall = time.monotonic() - t0
        return report(args, work, faults, soak_status, ref_status, soak_wall, all_wall)
    finally:
        for job in jobs:
            if not job_over(job):
                sh("scancel", job, check=False)
        for job in jobs:
            wait_for(f"job {job} cancelled", lambda: job_over(job), timeout=120)
        sh("umount", str(run / "checkpoints"), check=False)


def report(args, work: Path, faults: list[Fault], soak_status: int, ref_status: int, soak_wall: float,
           all_wall: float) -> bool:
    print(f"\n{'#':>2} {'drawn':>5} {'hit':>5} {'kind':<9} {'resumed':>7} {'expect':>6}  exit / what happened")
    for i, f in enumerate(faults, 1):
        print(f"{i:>2} {f.step:>5} {f.hit:>5} {f.kind:<9} {f.resumed:>7} {f.expected:>6}  {f.exit}; {f.what}")
    soak_loss, ref_loss = final_eval_loss(work / "soak"), final_eval_loss(work / "reference")
    rel = abs(soak_loss - ref_loss) / abs(ref_loss)
    n, dup, missing = step_report(work / "soak", args.steps)
    rn, rdup, rmissing = step_report(work / "reference", args.steps)
    print(f"\nfinal eval loss: soak {soak_loss:.9f}, reference {ref_loss:.9f} (uninterrupted, under SLURM), "
          f"relative difference {rel:.3g}")
    print(f"soak metrics.jsonl: {n} train records for {args.steps} steps, duplicated {dup or 'none'}, "
          f"missing {missing or 'none'}; reference: {rn} records, duplicated {rdup or 'none'}, "
          f"missing {rmissing or 'none'}")
    print(f"exit status of the last job: soak {soak_status}, reference {ref_status}")
    print(f"wall time: soak {soak_wall:.0f} s (from its submission), reference and soak {all_wall:.0f} s")
    problems = [f"fault {i} ({f.kind}@{f.hit}): {p}" for i, f in enumerate(faults, 1) for p in f.problems]
    problems += [f"final eval loss differs by {rel:.3g} relative (> 1e-6)"] if not rel <= 1e-6 else []
    problems += ["soak: steps not logged exactly once"] if dup or missing or n != args.steps else []
    problems += ["reference: steps not logged exactly once"] if rdup or rmissing or rn != args.steps else []
    problems += [f"soak's last job exited {soak_status}"] if soak_status != 0 else []
    problems += [f"reference exited {ref_status}"] if ref_status != 0 else []
    print("\n".join(f"FAILED: {p}" for p in problems) or "all checks passed")
    return not problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10, help="checkpoint.every_steps")
    parser.add_argument("--tmpfs-mb", type=int, default=128, help="size of the soak's checkpoints/ tmpfs")
    parser.add_argument("--workdir", default=None, help="default: a new directory under /tmp")
    args = parser.parse_args()
    if args.every < 1 or args.faults < 1 or args.steps - 6 * args.every - 1 < args.faults:
        print(f"--steps {args.steps}, --every {args.every}, --faults {args.faults}: need --every >= 1, --faults >= 1 "
              "and --steps - 6 x --every - 1 >= --faults (faults at distinct steps from the second checkpoint to "
              "4 x --every steps before the end)", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"fault soak: needs root (SLURM daemons, a tmpfs mount); running as uid {os.geteuid()}", file=sys.stderr)
        return 2
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bigbatch-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    with open(LOCK, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for {LOCK} (another user of the SLURM cluster)", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        started = cluster_up()
        try:
            return 0 if soak(args, work) else 1
        except SoakError as exc:
            print(f"FAILED: {exc}", flush=True)
            return 1
        finally:
            if started:
                sh("bash", "scripts/slurm_cluster.sh", "down", check=False)


if __name__ == "__main__":
    sys.exit(main())

"""Failure paths on real processes: damaged checkpoints and ``latest``, a NaN step, a hung, stopped or
killed rank, signals while a rank is stuck, unwritable and full output directories.

Every case runs train.py (tiny sizes, as in test_train.py) and asserts what the user sees: the exit
code, the message (naming the file, the tag, the rank), which tag a resume uses, and that nothing
half-written is left behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bigbatch.sharding import tags

from train_common import (FAULT_TRAIN, PY, REPO, TORCHRUN, check_ok, env, main, records, run, small_args, wait_at_step,
                          wait_reached)

pytestmark = pytest.mark.slow  # real process groups / daemons


def args(cache: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", *small_args(cache), "--train.eval_every", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, cache) -> Path:
    """One process, 10 steps, a checkpoint every 5 (tags step 5 and step 10)."""
    out = tmp_path_factory.mktemp("base") / "run"
    check_ok(run([PY, "train.py", *args(cache), "--out", str(out), "--train.max_steps", "10",
                  "--checkpoint.every_steps", "5", "--checkpoint.keep", "5"]))
    return out


def copy_run(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


def flip_bytes(path: Path, at: int = 200, n: int = 64) -> None:
    """Bit rot: overwrite bytes in place, size unchanged."""
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(os.urandom(n))


def no_temporaries(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if tags.atomic.TMP_MARK in p.name or ".bigbatch-write-test-" in p.name]


# ------------------------------------------------------------------ tags, latest (no launch)


def test_latest_is_only_a_hint(tmp_path):
    ck = tmp_path / "ck"
    for i, name in enumerate(("step00000005", "step00000010")):
        (ck / name).mkdir(parents=True)
        (ck / name / "f.bin").write_bytes(b"x" * (10 + i))
        tags.write_manifest(str(ck), name, {"f.bin": tags.file_hash(str(ck / name / "f.bin"))}, samples=5 * (i + 1))
    (ck / "half").mkdir()  # a save that never finished
    latest = ck / tags.LATEST
    for content, why in [(os.urandom(64), "unreadable"), (b"", "empty"), (b"step00000099", "not a complete checkpoint"),
                         (b"half", "not a complete checkpoint")]:
        latest.write_bytes(content)
        order, notes = tags.candidates(str(ck))
        assert order == ["step00000010", "step00000005"], (content, order)
        assert notes and why in notes[0][1], notes
    latest.unlink()
    assert tags.candidates(str(ck)) == (["step00000010", "step00000005"], [("latest", f"{latest}: missing")])
    latest.write_text("step00000005")
    assert tags.candidates(str(ck)) == (["step00000005", "step00000010"], [])
    flip_bytes(ck / "step00000010" / "f.bin", at=0, n=4)
    with pytest.raises(tags.CheckpointError, match=r"step00000010/f.bin: content hash .* does not match"):
        tags.verify_tag(str(ck), "step00000010")
    assert tags.retain(str(ck), 1, "step00000010") == ["step00000005"]  # "half" is newer: maybe being written
    assert sorted(p.name for p in ck.iterdir()) == ["half", "latest", "step00000010"]


def test_space_warning_and_write_errors(tmp_path):
    assert tags.space_warning(str(tmp_path / "missing" / "dir"), 10) is None
    assert "the next save will probably fail (no space left on device)" in tags.space_warning(str(tmp_path), 1 << 60)
    err = OSError(28, "No space left on device", str(tmp_path / "a.pt"))
    assert tags.describe_write_error(err, "x") == f"No space left on device (errno 28) writing {tmp_path / 'a.pt'}"


# ------------------------------------------------------------------ damaged checkpoints


def test_bit_rot_is_refused_and_the_previous_tag_used(base, tmp_path, capsys):
    from bigbatch.training.export import main as export_main

    out = copy_run(base, tmp_path / "rot")
    victim = out / "checkpoints" / "step00000010" / "bigbatch_full_state_part0.pt"
    flip_bytes(victim)
    assert export_main([str(out), "--out", str(tmp_path / "hf")]) == 0
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("export:")]
    assert said[0].startswith(f"export: passed over step00000010: {victim}: content hash"), said
    assert said[1] == f"export: checkpoint 'step00000005' of {out}", said
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "12"])
    check_ok(proc)
    assert "loaded checkpoint 'step00000005'" in proc.stderr and str(victim) in proc.stderr
    assert "content hash" in proc.stderr and "set aside as refused-step00000010" in proc.stderr
    # the refused tag is kept under another name, out of checkpoint.keep's count; step 10 was saved anew
    kept = out / "checkpoints" / "refused-step00000010" / victim.name
    assert kept.read_bytes() != (base / "checkpoints" / "step00000010" / victim.name).read_bytes()
    tags.verify_tag(str(out / "checkpoints"), "step00000010")
    ref = {r["step"]: r for r in records(base)}
    got = records(out)
    assert [r["step"] for r in got] == list(range(1, 13))  # steps 6..10 redone from step 5
    for r in got[:10]:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-6), r["step"]


def test_every_tag_damaged_refuses_to_restart_unless_asked(base, tmp_path):
    out = copy_run(base, tmp_path / "allbad")
    flip_bytes(out / "checkpoints" / "step00000005" / "bigbatch_full_state_part0.pt")
    with open(out / "checkpoints" / "step00000010" / "bigbatch_full_state_part0.pt", "r+b") as fh:
        fh.truncate(100)
    before = (out / "metrics.jsonl").read_text()
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "12"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no usable checkpoint" in proc.stderr and "every tag was refused" in proc.stderr
    assert "step00000010" in proc.stderr and "truncated" in proc.stderr
    assert "step00000005" in proc.stderr and "content hash" in proc.stderr
    assert "--checkpoint.if_unusable restart" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before  # nothing touched
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "3", "--checkpoint.if_unusable", "restart"])
    check_ok(proc)
    assert "starting from step 0 anyway" in proc.stdout
    assert [r["step"] for r in records(out)] == [1, 2, 3]


def test_damaged_latest_still_finds_the_newest_good_tag(base, tmp_path):
    out = copy_run(base, tmp_path / "latest")
    (out / "checkpoints" / "latest").write_bytes(os.urandom(64))
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "11"])
    check_ok(proc)
    assert "loaded checkpoint 'step00000010'" in proc.stderr and "latest: unreadable" in proc.stderr
    assert [r["step"] for r in records(out)] == list(range(1, 12))
    (out / "checkpoints" / "latest").unlink()
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "12"])
    check_ok(proc)
    assert "loaded checkpoint 'step00000011'" in proc.stderr and "latest: missing" in proc.stderr


class Planted:
    """A pickle that creates a directory when it is loaded: a stand-in for any code a planted
    checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(tag_dir: Path, marker: Path) -> Path:
    """Put a :class:`Planted` into the tag's meta and re-sign its manifest (sizes and content hashes
    recomputed), as someone with write access to a shared file system could; returns the file."""
    victim = tag_dir / tags.META
    meta = torch.load(victim, weights_only=False)
    meta["client_state"]["planted"] = Planted(str(marker))
    torch.save(meta, victim)
    old = json.loads((tag_dir / tags.MANIFEST).read_text())
    files = tags.tag_files(str(tag_dir))
    tags.write_manifest(str(tag_dir.parent), tag_dir.name, {f: tags.file_hash(str(tag_dir / f)) for f in files},
                        samples=old["samples"], steps=old.get("steps"))
    new = json.loads((tag_dir / tags.MANIFEST).read_text())["files"]
    assert all(new[f][tags.HASH] == tags.file_hash(str(tag_dir / f)) for f in files)  # the hash check passes
    return victim


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(base, tmp_path, capsys):
    from bigbatch.training.export import main as export_main

    out = copy_run(base, tmp_path / "planted")
    marker = tmp_path / "code-ran"
    victim = plant(out / "checkpoints" / "step00000010", marker)
    assert export_main([str(out), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: RUN_DIR:") and str(victim) in err and "would run code" in err, err
    assert len(err.splitlines()) == 1 and not marker.exists() and not (tmp_path / "hf").exists()
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "12"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and str(victim) in line[0] and "would run code" in line[0], proc.stderr[-3000:]
    assert not marker.exists() and "Traceback" not in proc.stderr
    assert [r["step"] for r in records(out)] == list(range(1, 11))  # the run is untouched
    # the planted tag gone, latest on the previous one: a resume says which tag it loaded
    shutil.rmtree(out / "checkpoints" / "step00000010")
    (out / "checkpoints" / "latest").write_text("step00000005")
    proc = run([PY, "train.py", "--resume", str(out), "--train.max_steps", "6"])
    check_ok(proc)
    loaded = [ln for ln in proc.stdout.splitlines() if "loaded checkpoint" in ln]
    assert loaded == [f"bigbatch: loaded checkpoint 'step00000005' from {out / 'checkpoints'}"], proc.stdout


# ------------------------------------------------------------------ non-finite steps


def _full_state(tag_dir: Path) -> dict:
    return torch.load(tag_dir / "bigbatch_full_state_part0.pt", weights_only=False)["params"]


def test_nan_step_changes_no_state_and_the_run_continues(tmp_path, cache):
    out = tmp_path / "nan"
    proc = subprocess.run([PY, FAULT_TRAIN, *args(cache), "--out", str(out), "--train.max_steps", "6",
                           "--checkpoint.every_steps", "1", "--checkpoint.keep", "10"], cwd=REPO,
                          env={**env(), "BIGBATCH_TEST_NAN_STEPS": "3"}, capture_output=True, text=True, timeout=240)
    check_ok(proc)
    assert "step 3: gradient norm inf is not finite; the optimizer step was skipped" in proc.stdout
    skipped = records(out, "skipped_step")
    assert [(r["step"], r["skipped_steps"]) for r in skipped] == [(3, 1)]
    train = records(out)
    assert [r["skipped_steps"] for r in train] == [0, 0, 1, 1, 1, 1]
    ck = out / "checkpoints"
    before, after = _full_state(ck / "step00000002"), _full_state(ck / "step00000003")
    for name, entry in before.items():  # weights, moments and step counters untouched by the skipped step
        assert torch.equal(entry["fp32"], after[name]["fp32"]), name
        for key, value in entry["state"].items():
            assert torch.equal(value, after[name]["state"][key]), (name, key)
    meta2 = torch.load(ck / "step00000002" / "bigbatch_meta.pt", weights_only=False)
    meta3 = torch.load(ck / "step00000003" / "bigbatch_meta.pt", weights_only=False)
    assert meta2["group_steps"] == meta3["group_steps"]
    # resuming after the skip (on two processes) continues the same run
    ref = {r["step"]: r for r in train}
    shutil.rmtree(ck / "step00000006")
    shutil.rmtree(ck / "step00000005")
    shutil.rmtree(ck / "step00000004")
    check_ok(run(TORCHRUN + ["train.py", "--resume", str(out), "--train.max_steps", "6"]))
    for r in records(out)[3:]:
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-5), r["step"]


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, cache):
    out = tmp_path / "nan3"
    proc = subprocess.run([PY, FAULT_TRAIN, *args(cache), "--out", str(out), "--train.max_steps", "10",
                           "--train.max_skipped_steps", "3"], cwd=REPO,
                          env={**env(), "BIGBATCH_TEST_NAN_STEPS": "2,3,4"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 optimizer steps in a row had non-finite gradients (train.max_skipped_steps=3); stopping at step 4" \
        in proc.stderr
    assert [r["step"] for r in records(out, "skipped_step")] == [2, 3, 4] and records(out)[-1]["step"] == 3


# ------------------------------------------------------------------ hung, stopped and killed ranks


def _workers(torchrun: subprocess.Popen, timeout: float = 120) -> dict[int, int]:
    """{rank: pid} of torchrun's workers once they are training."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in Path("/proc").iterdir():
            if not child.name.isdigit():
                continue
            try:
                environ = (child / "environ").read_bytes().split(b"\0")
                stat = (child / "stat").read_text().split()
            except OSError:
                continue
            vars_ = dict(e.split(b"=", 1) for e in environ if b"=" in e)
            if vars_.get(b"TORCHELASTIC_RUN_ID") and int(stat[3]) == torchrun.pid:
                found[int(vars_[b"RANK"])] = int(child.name)
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun's workers did not start")


WAIT_STEP = 6  # the step after which the runs of rank_faults wait for the test's fault


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] in ("Z", "X")
    except OSError:
        return True


# The three rank faults run concurrently, each on its own 2-rank run: most of each case is waiting (for the
# watchdog, for torchrun's 30 s grace before it kills a stopped worker), and the waits overlap.
RANK_FAULTS = {
    "stopped": ["--train.step_timeout_s", "8", "--train.collective_timeout_s", "120"],
    "killed": ["--train.step_timeout_s", "60"],
    "stuck": ["--train.step_timeout_s", "600", "--checkpoint.signal_grace_s", "5", "--checkpoint.every_steps", "2"],
}


@dataclasses.dataclass
class Faulted:
    """One run's outcome after its fault: seconds from the fault to rank 0's exit and to the job's end."""
    out: Path
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    rank0_s: float | None = None
    job_s: float | None = None
    latest_before: str | None = None


def _log(opened: list, path: Path):
    fh = open(path, "wb")
    opened.append(fh)
    return fh


@pytest.fixture(scope="module")
def rank_faults(tmp_path_factory, cache) -> dict[str, Faulted]:
    """Starts the three runs of RANK_FAULTS; once all three wait after step WAIT_STEP, sends the faults at
    once: rank 1 stopped (SIGSTOP), rank 1 killed (SIGKILL), rank 1 stopped and SIGTERM to torchrun."""
    root = tmp_path_factory.mktemp("rank_faults")
    procs: dict[str, subprocess.Popen] = {}
    results = {name: Faulted(out=root / name) for name in RANK_FAULTS}
    pids: dict[str, dict[int, int]] = {}
    logs = []
    try:
        for name, extra in RANK_FAULTS.items():
            res = results[name]
            wait = root / f"{name}.wait"
            procs[name] = subprocess.Popen(
                TORCHRUN + [FAULT_TRAIN, *args(cache), "--out", str(res.out), "--train.max_steps", "100000", *extra],
                cwd=REPO, env={**env(), **wait_at_step(wait, WAIT_STEP)}, stdout=_log(logs, root / f"{name}.out"),
                stderr=_log(logs, root / f"{name}.err"), start_new_session=True)
        for name, proc in procs.items():
            wait_reached(proc, root / f"{name}.wait")
            pids[name] = _workers(proc)
        results["stuck"].latest_before = (results["stuck"].out / "checkpoints" / "latest").read_text()
        os.kill(pids["stopped"][1], signal.SIGSTOP)  # both wait after step 6: rank 0's next poll never returns
        os.kill(pids["killed"][1], signal.SIGKILL)
        # rank 1 stopped while both wait after step 6: rank 0's next poll of the signal flag never returns, so
        # the signal cannot reach the checkpoint on any rank
        os.kill(pids["stuck"][1], signal.SIGSTOP)
        procs["stuck"].send_signal(signal.SIGTERM)  # to torchrun, which forwards it to its workers
        t0 = time.monotonic()
        while time.monotonic() - t0 < 90 and any(r.job_s is None for r in results.values()):
            for name, res in results.items():
                if res.rank0_s is None and _gone(pids[name][0]):
                    res.rank0_s = time.monotonic() - t0
                if res.job_s is None and procs[name].poll() is not None:
                    res.job_s = time.monotonic() - t0
            time.sleep(0.1)
    finally:
        for name, proc in procs.items():
            for pid in pids.get(name, {}).values():  # never leave a stopped worker behind
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        for fh in logs:
            fh.close()
    for name, res in results.items():
        res.rc = procs[name].returncode
        res.stdout, res.stderr = (root / f"{name}.out").read_text(), (root / f"{name}.err").read_text()
    return results


def test_a_stopped_rank_ends_the_job_within_the_timeout(rank_faults):
    r = rank_faults["stopped"]
    # the healthy rank leaves within the timeout (+ a step); torchrun then needs its own grace (30 s) to
    # kill the stopped one
    assert r.rank0_s is not None and r.rank0_s < 20 and r.rc != 0 and r.job_s is not None and r.job_s < 60, \
        (r.rank0_s, r.rc, r.job_s, r.stderr[-3000:])
    assert "[bigbatch watchdog] rank 0: no progress for" in r.stderr and "train.step_timeout_s=8" in r.stderr
    assert "Ranks that stopped answering: rank 1 (last progress at step" in r.stderr


def test_a_killed_rank_ends_the_job(rank_faults):
    r = rank_faults["killed"]
    assert r.rc != 0 and r.job_s is not None and r.job_s < 45, (r.rc, r.job_s, r.stderr[-3000:])


def test_a_signal_while_a_rank_is_stuck_ends_promptly_and_says_so(rank_faults):
    r = rank_faults["stuck"]
    # the last save before the wait: step 6's periodic save would come at its sync point, after the wait
    assert r.latest_before == f"step{WAIT_STEP - 2:08d}"
    assert r.rank0_s is not None and r.rank0_s < 12 and r.rc != 0 and r.job_s is not None and r.job_s < 60, \
        (r.rank0_s, r.rc, r.job_s, r.stderr[-3000:])
    assert "SIGTERM arrived" in r.stderr and "stuck in a collective, so no checkpoint can be written" in r.stderr
    latest = r.out / "checkpoints" / "latest"
    assert (latest.read_text() if latest.exists() else None) == r.latest_before and not no_temporaries(r.out)


# ------------------------------------------------------------------ output directories


def test_unusable_output_directories_exit_2_with_one_line(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    base = args(cache)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a read-only tmpfs for the test: {mounted.stderr!r}"
    try:
        cases = [
            (ro / "run", f"--out: {ro / 'run'}: cannot be created (Read-only file system)"),
            (a_file, f"--out: {a_file}: exists and is not a directory"),
            (a_file / "run", f"--out: {a_file / 'run'}: {a_file} is a file, not a directory"),
            (Path("/proc/bigbatch-run"), "--out: /proc/bigbatch-run: cannot be created ("),
        ]
        for out, message in cases:
            assert main([*base, "--out", str(out)]) == 2
            err = capsys.readouterr().err
            assert message in err, (message, err)
            assert err.count("\n") == 1 and "Traceback" not in err
        assert main([*base, "--out", str(tmp_path / "ok"), "--data.cache_dir", str(ro / "cache")]) == 2
        assert f"data.cache_dir: {ro / 'cache'}: cannot be created (Read-only file system)" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(ro)])


def _small_fs(path: Path, megabytes: float) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k", "tmpfs", str(path)],
                             capture_output=True)
    assert mounted.returncode == 0, f"cannot mount a small tmpfs for the test: {mounted.stderr!r}"


def test_full_disk_stops_the_run_cleanly(tmp_path, cache):
    """Checkpoints on a 0.75 MB file system (one tag of this model is ~0.5 MB on 2 ranks): the second save
    fails on every rank, naming the file; its files are removed; 'latest' and the first tag stay."""
    out = tmp_path / "full"
    _small_fs(out / "checkpoints", 0.75)
    try:
        proc = run(TORCHRUN + ["train.py", *args(cache), "--out", str(out), "--train.max_steps", "30",
                               "--checkpoint.every_steps", "10"])
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert "checkpoint 'step00000020'" in proc.stderr and "was not saved" in proc.stderr
        assert "No space left on device" in proc.stderr or "no space left on device" in proc.stderr
        assert str(out / "checkpoints" / "step00000020") in proc.stderr
        assert "'latest' still names 'step00000010'" in proc.stderr
        assert (out / "checkpoints" / "latest").read_text() == "step00000010"
        assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step00000010"]
        assert not no_temporaries(out)
        tags.verify_tag(str(out / "checkpoints"), "step00000010")
        assert records(out)[-1]["step"] == 20
        # the same with on_save_error: continue, and no final save: the run finishes, the failure recorded
        shutil.rmtree(out / "checkpoints" / "step00000010")
        proc = run(TORCHRUN + ["train.py", *args(cache), "--out", str(out), "--overwrite", "--train.max_steps", "30",
                               "--checkpoint.every_steps", "10", "--checkpoint.on_save_error", "continue",
                               "--checkpoint.at_end", "false"])
        check_ok(proc)
        errors = records(out, "checkpoint_error")
        assert [e["step"] for e in errors] == [20] and "was not saved" in errors[0]["message"]
        assert "Training continues" in proc.stdout
    finally:
        subprocess.run(["umount", str(out / "checkpoints")])


# ------------------------------------------------------------------ a kill during a background save


def test_a_kill_during_a_background_save_leaves_latest_on_the_previous_tag(tmp_path, cache):
    """FSDP2's periodic saves complete in the background (checkpoint.async_save): a job killed while one
    is in flight (SIGKILL to every process, as a node failure) leaves that tag without a manifest,
    ``latest`` on the previous complete tag, and a resume continues from there. The save of step 4
    waits (tests/fault/train.py), its shards written and its manifest not, until the kill."""
    out, wait = tmp_path / "run", tmp_path / "wait"
    proc = subprocess.Popen(TORCHRUN + [FAULT_TRAIN, *args(cache), "--out", str(out), "--train.engine", "fsdp2",
                                        "--train.max_steps", "400", "--checkpoint.every_steps", "2",
                                        "--checkpoint.keep", "3"],
                            cwd=REPO, env={**env(), "BIGBATCH_TEST_WAIT_AT_SAVE": "step00000004",
                                           "BIGBATCH_TEST_WAIT_FILE": str(wait)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ckpt, pids = out / "checkpoints", {}

    def kill_all():
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    try:
        pids = _workers(proc)
        wait_reached(proc, wait)
        partial = ckpt / "step00000004"
        assert any(partial.glob("*.distcp")) and not (partial / tags.MANIFEST).exists()
        kill_all()
    finally:
        kill_all()
        proc.communicate(timeout=60)
    assert not (partial / tags.MANIFEST).exists()
    assert tags.read_latest(str(ckpt)) == "step00000002"
    tags.verify_tag(str(ckpt), "step00000002")  # complete and good: every byte hashed before latest moved
    proc = run(TORCHRUN + ["train.py", "--resume", str(out), "--train.max_steps", "4"])
    check_ok(proc)
    assert "steps 2->4 " in proc.stdout, proc.stdout[-2000:]  # from the complete tag
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]

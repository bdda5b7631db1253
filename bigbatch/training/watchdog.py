"""A watchdog thread on every rank: a rank that stops making progress ends the job instead of holding
its allocation.

The loop reports progress (:meth:`Watchdog.beat`: a step, an evaluation, a save). The thread
publishes it as a heartbeat in the process group's key-value store (rank, last step, when), so that
a rank that times out can name the ranks that stopped answering. Two things end the process with
``exit_codes.HUNG`` and one message on stderr:

* no progress for ``step_timeout_s`` (a rank stopped, a deadlock, a collective that never
  returns): the launcher (torchrun, srun, mpirun) then tears the other ranks down;
* SIGTERM/SIGUSR1 arrived but the loop did not reach its checkpoint within ``signal_grace_s``:
  the rank is stuck in a collective, so no checkpoint can be written; it says so and exits before
  the launcher's kill, instead of promising a checkpoint. The thread sees the signal at once
  through ``signal.set_wakeup_fd``, while Python's own handler waits for the stuck main thread.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time

from bigbatch import exit_codes

_KEY = "bigbatch/heartbeat/{}"


def _default_store():
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            return dist.distributed_c10d._get_default_store()
    except Exception:  # no store (a lone process, or another backend): heartbeats are local only
        pass
    return None


class Watchdog:
    """See the module docstring. ``step_timeout_s`` 0 turns the progress check off; the signal check
    is on whenever the watchdog runs."""

    def __init__(self, *, step_timeout_s: float, signal_grace_s: float, rank: int, world_size: int,
                 signals=(signal.SIGTERM, signal.SIGUSR1), poll_s: float | None = None):
        self.step_timeout_s = float(step_timeout_s)
        self.signal_grace_s = float(signal_grace_s)
        self.rank, self.world_size = rank, world_size
        self.signals = {int(s) for s in signals}
        self.poll_s = poll_s or max(0.2, min(5.0, self.signal_grace_s / 4,
                                              self.step_timeout_s / 10 if self.step_timeout_s else 5.0))
        self.store = _default_store()
        self.last, self.what, self.step = time.monotonic(), "start", 0
        self.signal_at: float | None = None
        self.signum: int | None = None
        self.at_save_point = False
        self._closed = threading.Event()
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="bigbatch-watchdog", daemon=True)
        self._thread.start()

    def beat(self, what: str, step: int) -> None:
        """Progress: ``what`` (step, eval, save, ...) at ``step``. Cheap: no I/O on this thread."""
        self.last, self.what, self.step = time.monotonic(), what, step

    def reached_save_point(self) -> None:
        """After a signal, the loop is at its checkpoint: no longer stuck."""
        self.at_save_point = True

    def close(self) -> None:
        self._closed.set()
        try:
            os.write(self._write, b"\0")  # wake the thread from its wait: the run's end does not wait a poll
        except OSError:
            pass
        self._thread.join(timeout=2 * self.poll_s + 1)
        signal.set_wakeup_fd(self._old_wakeup)
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------------ the thread

    def _publish(self) -> None:
        if self.store is None:
            return
        try:
            now = time.time()
            self.store.set(_KEY.format(self.rank), f"{self.step} {now - (time.monotonic() - self.last)} {now}")
        except Exception:  # the store's host is gone: the timeouts still fire
            self.store = None

    def peers(self, limit_s: float = 5.0) -> str:
        """What the heartbeats say about the other ranks: those behind this one, or unreadable."""
        if self.store is None or self.world_size == 1:
            return ""
        found: dict[int, tuple[int, float, float]] = {}  # rank: (step, progress time, heartbeat time)

        def read():
            for r in range(self.world_size):
                key = _KEY.format(r)
                if self.store.check([key]):
                    step, at, beat = self.store.get(key).decode().split()
                    found[r] = (int(step), float(at), float(beat))

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(limit_s)
        now = time.time()
        if not found:
            return " The process group's store did not answer, so the other ranks' progress is unknown."
        newest = max(s for s, _, _ in found.values())
        # behind the others, or its watchdog silent too (a stopped or dead process)
        behind = [f"rank {r} (last progress at step {s}, {now - at:.0f} s ago)"
                  for r, (s, at, beat) in sorted(found.items())
                  if r != self.rank and (s < newest or now - beat > self.poll_s * 3 + 1)]
        silent = [f"rank {r}" for r in range(self.world_size) if r not in found]
        parts = behind + [f"{x} (no heartbeat)" for x in silent]
        return f" Ranks that stopped answering: {', '.join(parts)}." if parts else ""

    def _fire(self, message: str) -> None:
        text = f"[bigbatch watchdog] rank {self.rank}: {message}{self.peers()} Exiting with code {exit_codes.HUNG}."
        print(text, file=sys.stderr, flush=True)
        os._exit(exit_codes.HUNG)

    def _run(self) -> None:
        self._publish()
        while not self._closed.is_set():
            ready, _, _ = select.select([self._read], [], [], self.poll_s)
            if ready:
                try:
                    data = os.read(self._read, 64)
                except OSError:
                    data = b""
                for b in data:
                    if b in self.signals and self.signal_at is None:
                        self.signal_at, self.signum = time.monotonic(), b
            self._publish()
            now = time.monotonic()
            if self.signal_at is not None and not self.at_save_point and now - self.signal_at > self.signal_grace_s:
                name = signal.Signals(self.signum).name
                self._fire(f"{name} arrived {now - self.signal_at:.0f} s ago, but this rank has been inside "
                           f"'{self.what}' since step {self.step} ({now - self.last:.0f} s): it is stuck in a "
                           "collective, so no checkpoint can be written (the last complete one stays).")
            if self.step_timeout_s and not self.at_save_point and now - self.last > self.step_timeout_s:
                self._fire(f"no progress for {now - self.last:.0f} s (train.step_timeout_s={self.step_timeout_s:g}); "
                           f"last: '{self.what}' at step {self.step}.")

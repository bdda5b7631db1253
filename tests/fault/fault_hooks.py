"""Test-only fault points for the product's commands: a run waits at a point the test names, so that
a signal or a kill lands there whatever the machine's speed. Nothing here is part of bigbatch; the
wrappers next to this file (``train.py``, ``prepare_data.py``) run the product's own entry points
with these hooks, configured by environment variables:

``BIGBATCH_TEST_WAIT_FILE=PATH``
    the file of every wait: the run writes ``PATH.reached`` when it waits, and waits until ``PATH``
    exists (or, at a step, until a signal arrived). The test sends its fault after ``PATH.reached``.
``BIGBATCH_TEST_WAIT_AT_STEP=N`` (train.py)
    after optimizer step N (in ``post_step``, after the checkpoint callback and before the preemption
    callback by priority), every rank waits until SIGTERM/SIGUSR1 reached any rank or PATH exists; the
    ranks poll together (one all-reduce per poll), so they leave at the same poll, and step N is made a
    sync point, where the preemption callback agrees on the signal on every rank: the checkpoint is step
    N's. ``PATH.reached`` is
    written after the first poll, when every rank is inside the wait. A resumed run that starts past
    step N does not wait.
``BIGBATCH_TEST_WAIT_AT_SAVE=TAG`` (train.py)
    a save of TAG completing in the background (FSDP2's async save) waits, on every rank, after its
    shards and files are written and before its manifest and ``latest``: a kill then leaves TAG
    without a manifest.
``BIGBATCH_TEST_NAN_STEPS=5,9`` (train.py)
    the loss of those optimizer steps (1-based) is multiplied by NaN, by a forward hook on the model
    (``trainer.engine.module``: the module DeepSpeed and FSDP2 both call), armed from ``pre_step`` to
    ``post_step`` so that an evaluation never sees it.
``BIGBATCH_TEST_WAIT_AFTER_SHARDS=K`` (prepare_data.py, with ``--workers 1``)
    after the K-th shard this process wrote, it waits until PATH exists.
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.05  # s between two looks at the signal and the wait file


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def wait_file() -> str:
    path = _env("BIGBATCH_TEST_WAIT_FILE")
    if path is None:
        raise SystemExit("fault hooks: BIGBATCH_TEST_WAIT_FILE is needed with a BIGBATCH_TEST_WAIT_* variable")
    return path


def reached(path: str) -> None:
    """Tell the test the run waits (``PATH.reached``, created whole by a rename)."""
    tmp = f"{path}.reached.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    os.replace(tmp, f"{path}.reached")


def wait_for_file(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(POLL_S)


# ------------------------------------------------------------------ train.py callbacks


def _callback_classes():
    from bigbatch import distributed as bbdist
    from bigbatch.training.callbacks import Callback

    class WaitAtStep(Callback):
        """After step ``step``, every rank waits until a signal reached any rank (``preemption.signum``)
        or ``path`` exists; see the module docstring."""

        priority = 65  # after Checkpointing, before Preemption

        def __init__(self, step: int, path: str, preemption):
            self.step, self.path, self.preemption = step, path, preemption

        def wants_sync(self, trainer) -> bool:
            return trainer.step == self.step

        def post_step(self, trainer, result) -> None:
            if trainer.step != self.step:
                return
            first = True
            while True:
                trainer.beat("waiting for the test's fault")
                if bbdist.any_rank(self.preemption.signum is not None or os.path.exists(self.path)):
                    return
                if first and trainer.info.is_main:
                    reached(self.path)
                first = False
                time.sleep(POLL_S)

    class NanLoss(Callback):
        """The loss of the optimizer steps in ``steps`` (1-based) times NaN; see the module docstring."""

        priority = 0  # disarmed before any other callback runs the model

        def __init__(self, steps: set[int]):
            self.steps, self.armed, self.handle = steps, False, None

        def on_start(self, trainer) -> None:
            self.handle = trainer.engine.module.register_forward_hook(self._poison)

        def pre_step(self, trainer) -> None:
            self.armed = trainer.step + 1 in self.steps

        def post_step(self, trainer, result) -> None:
            self.armed = False

        def close(self, trainer) -> None:
            if self.handle is not None:
                self.handle.remove()

        def _poison(self, module, args, output):
            if self.armed:
                output["loss"] = output["loss"] * float("nan")
            return output

    return WaitAtStep, NanLoss


def with_test_callbacks(default_callbacks):
    """``default_callbacks`` of train.py, plus the callbacks the environment asks for."""
    from bigbatch.training.callbacks import Preemption

    WaitAtStep, NanLoss = _callback_classes()

    def callbacks(cfg, **kw):
        cbs = list(default_callbacks(cfg, **kw))
        nan = _env("BIGBATCH_TEST_NAN_STEPS")
        if nan is not None:
            cbs.append(NanLoss({int(s) for s in nan.split(",") if s.strip()}))
        step = _env("BIGBATCH_TEST_WAIT_AT_STEP")
        if step is not None:
            preemption = next(cb for cb in cbs if isinstance(cb, Preemption))
            cbs.append(WaitAtStep(int(step), wait_file(), preemption))
        return cbs

    return callbacks


def install_save_wait() -> None:
    """``BIGBATCH_TEST_WAIT_AT_SAVE``: a background save of that tag waits before its manifest."""
    tag = _env("BIGBATCH_TEST_WAIT_AT_SAVE")
    if tag is None:
        return
    path = wait_file()
    from bigbatch import distributed as bbdist
    from bigbatch.sharding import tags

    finish = tags.TagSave.finish

    def waiting_finish(self, *, keep=None, **order):
        if self.tag == tag and threading.current_thread() is not threading.main_thread():
            if bbdist.rank() == 0:
                reached(path)
            wait_for_file(path)
        return finish(self, keep=keep, **order)

    tags.TagSave.finish = waiting_finish


# ------------------------------------------------------------------ prepare-data


def install_shard_wait() -> None:
    """``BIGBATCH_TEST_WAIT_AFTER_SHARDS``: wait after that many shards (a ``--workers 1`` run: the
    shards are encoded in this process, in order)."""
    count = _env("BIGBATCH_TEST_WAIT_AFTER_SHARDS")
    if count is None:
        return
    path, after = wait_file(), int(count)
    from bigbatch.data import prepare

    encode = prepare.encode_piece
    written = [0]

    def waiting_encode(task):
        result = encode(task)
        written[0] += 1
        if written[0] == after:
            reached(path)
            wait_for_file(path)
        return result

    prepare.encode_piece = waiting_encode

"""The run's checkpoints: the engine's state and every stateful component's, by name."""

from __future__ import annotations

from bigbatch import exit_codes
from bigbatch.sharding import tags
from bigbatch.sharding.full_state import IncompatibleCheckpoint
from bigbatch.sharding.tags import CheckpointError, CheckpointSaveError
from bigbatch.training.config import ConfigError
from bigbatch.training.run_state import RunStopped


class Checkpointer:
    """Saves and restores ``engine`` in ``ckpt_dir`` with a client state made of ``states``: named
    objects with ``state_dict()`` / ``load_state_dict()`` (the Trainer's run state, the noise meter,
    callbacks with a ``state_key``). The state named ``trainer`` is stored flat (step, samples, tokens,
    global_batch, ...), every other one under its name. ``beat(what)``: progress for the watchdog;
    ``warn(record, text)``: a record of the run and a line for the user."""

    def __init__(self, engine, ckpt_dir: str, states: dict, *, keep: int, on_save_error: str, if_unusable: str,
                 beat=lambda what: None, warn=lambda record, text: None):
        self.engine, self.ckpt_dir, self.states = engine, ckpt_dir, states
        self.keep, self.on_save_error, self.if_unusable = keep, on_save_error, if_unusable
        self.beat, self.warn = beat, warn

    def restore(self, source: str, *, tag: str | None = None) -> tuple[dict | None, str | None]:
        """Load the newest good checkpoint of ``source`` (or ``tag``; collective) into the engine and the
        states: ``(client state, note)``; None to start from step 0. None usable is a ConfigError naming
        every tag and why, unless ``checkpoint.if_unusable`` is ``restart``."""
        try:
            client, note = self.engine.load(source, if_unusable=self.if_unusable, tag=tag)
        except tags.UnsafeCheckpoint as exc:
            raise ConfigError(f"--resume: {exc}") from None
        except CheckpointError as exc:  # NoUsableCheckpoint, or the one tag asked for
            raise ConfigError(f"--resume: {exc}\nto start from step 0 anyway, pass --checkpoint.if_unusable "
                              "restart") from None
        except IncompatibleCheckpoint as exc:  # another engine's tag that this run cannot take
            raise ConfigError(f"--resume: {exc}") from None
        if client is not None:
            for name, obj in self.states.items():
                if name == "trainer":
                    obj.load_state_dict(client)
                elif client.get(name):
                    obj.load_state_dict(client[name])
        return client, note

    def save(self, step: int, *, periodic: bool = False) -> bool:
        """Save at ``step`` (collective). False: a periodic save failed and ``checkpoint.on_save_error``
        is ``continue`` (recorded); otherwise a failed save stops the run."""
        warning = tags.space_warning(self.ckpt_dir, tags.expected_bytes(self.ckpt_dir) or self.engine.state_bytes())
        if warning:
            self.warn({"kind": "warning", "message": warning}, f"warning: {warning}")
        self.beat("checkpoint save")
        client = {}
        for name, obj in self.states.items():
            if name == "trainer":
                client.update(obj.state_dict())
            else:
                client[name] = obj.state_dict()
        try:  # a periodic save may complete in the background (FSDP2's checkpoint.async_save)
            self.engine.save(self.ckpt_dir, tag=f"step{step:08d}", client_state=client, keep=self.keep,
                             background=periodic)
        except CheckpointSaveError as exc:
            return self._failed(exc, periodic)
        self.beat("checkpoint saved")
        return True

    def wait(self) -> bool:
        """Until a save completing in the background is done (collective); False when it failed and
        ``checkpoint.on_save_error`` is ``continue``."""
        try:
            self.engine.wait_saves()
        except CheckpointSaveError as exc:
            return self._failed(exc, periodic=True)
        return True

    def _failed(self, exc: CheckpointSaveError, periodic: bool) -> bool:
        if periodic and self.on_save_error == "continue":
            self.warn({"kind": "checkpoint_error", "message": str(exc)},
                      f"warning: {exc} Training continues (checkpoint.on_save_error: continue).")
            return False
        raise RunStopped(exit_codes.SAVE_FAILED, f"error: {exc}") from None

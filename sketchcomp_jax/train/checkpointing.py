"""Orbax checkpoints of a training run: train state + grain iterator state + config JSON, one step each.

`WORKDIR/checkpoints/<step>/{state,data,config}`. Saves are asynchronous (the step loop goes on while
arrays are written) and `max_to_keep` prunes old steps. Restoring takes the abstract state with the
*current* mesh's shardings, so a run saved on 8 devices restores on 4.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from sketchcomp_jax.parallel.mesh import AnyProcess, all_processes, barrier

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        from sketchcomp_jax.paths import absolute

        self.directory = absolute(workdir) / "checkpoints"  # local or gs:// (Orbax writes arrays via tensorstore)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, config: dict, force: bool = False) -> bool:
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state onto the shardings carried by `abstract_state` (ShapeDtypeStructs) and the
        data iterator in place; returns the state."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_latest_good(self, abstract_state: Any, data_iterator: Any) -> tuple[int | None, Any]:
        """(step, state) of the newest checkpoint that every process restores, or (None, None) when there is
        none. A checkpoint that fails (a truncated or missing file, a crash mid-save on a file system without
        atomic renames) is reported in one line and the previous step is tried; once an older step restored,
        the failed newer ones are moved to `WORKDIR/checkpoints_unrestorable/` (kept for inspection, never
        deleted) so the resumed run can save those step numbers again. When no step restores (e.g. the config
        changed the model's shapes) nothing is moved and `UnrestorableCheckpoint` names each step's reason."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, reason = self.restore(step, abstract_state, data_iterator), None
            except Exception as e:  # anything a damaged checkpoint can raise (tensorstore, OSError, JSON, grain)
                state, reason = None, _one_line(e)
            if all_processes(reason is None):
                if failed:
                    self._set_aside([s for s, _ in failed])
                return step, state
            reason = reason or "another process could not restore it"
            log.warning("checkpoint step %d in %s could not be restored (%s): trying the previous step",
                        step, self.directory, reason)
            failed.append((step, reason))
        if failed:
            raise UnrestorableCheckpoint(
                f"no checkpoint in {self.directory} could be restored: "
                + "; ".join(f"step {s}: {r}" for s, r in failed)
                + ". If the config changed the model or the mesh strategy, use the config the run was started "
                "with (or a new --workdir)")
        return None, None

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unrestorable step directories out of Orbax's view (process 0), then reloads the step list."""
        aside = self.directory.parent / "checkpoints_unrestorable"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                target, n = aside / str(step), 1
                while target.exists():
                    target, n = aside / f"{step}.{n}", n + 1
                (self.directory / str(step)).rename(target)
                log.warning("moved the unrestorable checkpoint step %d to %s (nothing deleted)", step, target)
        barrier("sketchcomp: unrestorable checkpoints moved")
        self.manager.reload()

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class UnrestorableCheckpoint(ValueError):
    """No checkpoint of a run restores (a ValueError: the CLIs print its one-line message)."""


def _one_line(error: BaseException, limit: int = 400) -> str:
    """`Type: first line of the message` of the innermost cause (Orbax wraps tensorstore's precise error,
    e.g. `OUT_OF_RANGE: Error reading … byte range … size …`, in a generic one whose message is a spec
    thousands of characters long), cut to `limit` characters."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"


class PreemptionFlag:
    """Set by SIGTERM/SIGINT (TPU maintenance events, SLURM pre-emption, Ctrl-C): the loop saves and exits.

    A signal reaches one process, but every process must save the same step and leave together (the others
    would otherwise wait in the next collective for ever). `should_stop()`, called by every process at every
    step boundary, ORs the flag over all processes with a tiny collective that is dispatched at one boundary
    and read at the next (so it never stalls the device pipeline): every process sees the same answer at
    the same step, one or two steps after the signal."""

    def __init__(self, mesh=None):
        self.requested = False
        self._any = AnyProcess(mesh) if mesh is not None and jax.process_count() > 1 else None
        self._pending = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self.requested = True

    def should_stop(self) -> bool:
        """The agreed decision (same value on every process at the same call): True once any process was signalled."""
        if self._any is None:
            return self.requested
        decided = self._pending is not None and bool(self._pending)
        self._pending = None if decided else self._any.start(self.requested)
        return decided

    def restore_handlers(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def config_to_json(cfg) -> dict:
    """ConfigDict → JSON-safe dict (for the checkpoint's `config` item)."""
    return json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else dict(cfg)


def host_state(state: Any) -> Any:
    return jax.device_get(state)


def load_training_params(workdir: str | os.PathLike, step: int, ema: str = "unet"):
    """(ModelConfig, full params, EMA `{'unet', 'num_updates'}` or None, step) of a training checkpoint, as
    host arrays, read parameters-only (never the optimizer state): see `train/param_restore.py`."""
    from sketchcomp_jax.train.param_restore import load_training_params as load_params_only

    return tuple(load_params_only(workdir, step, ema=ema))

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

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, workdir: str | os.PathLike, max_to_keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
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

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class PreemptionFlag:
    """Set by SIGTERM/SIGINT (TPU maintenance events, SLURM pre-emption, Ctrl-C): the loop saves and exits."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum, frame):
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self.requested = True

    def restore_handlers(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def config_to_json(cfg) -> dict:
    """ConfigDict → JSON-safe dict (for the checkpoint's `config` item)."""
    return json.loads(cfg.to_json_best_effort()) if hasattr(cfg, "to_json_best_effort") else dict(cfg)


def host_state(state: Any) -> Any:
    return jax.device_get(state)


def load_training_params(workdir: str | os.PathLike, step: int):
    """(ModelConfig, full params, EMA of the trainable params or None, step) of a training checkpoint,
    as host arrays — for export and evaluation without the trainer's mesh."""
    from sketchcomp_jax.models.config import ModelConfig
    from sketchcomp_jax.train.state import merge_params

    workdir = pathlib.Path(workdir).absolute()
    config_path = workdir / "model_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} missing: {workdir} is not a launch/train.py work directory")
    config = ModelConfig.from_dict(json.loads(config_path.read_text()))
    state_dir = workdir / "checkpoints" / str(step) / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
        tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype,
                                           sharding=jax.sharding.SingleDeviceSharding(jax.local_devices()[0])),
            tree, is_leaf=lambda m: hasattr(m, "shape"))
        state = ckptr.restore(state_dir, target)
    state = jax.device_get(state)
    params = merge_params(state["trainable"], state["frozen"])
    return config, params, state.get("ema"), int(state["step"])

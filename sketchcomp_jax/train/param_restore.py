"""Parameter-only restores of a training checkpoint: what sampling, export, evaluation and the app read.

A training checkpoint's `state` item is the whole `TrainState` (`step`, `trainable`, `frozen`, `opt_state`,
`ema`). The tools that only *use* the model need the parameters — `trainable` + `frozen` merged into
`{'unet', 'vae', 'conditioner'}`, or the EMA U-Net instead of the raw one — so they restore just those
subtrees with Orbax's partial restore (`PyTreeRestore(partial_restore=True)`): the Adam moments (2x the
trainable parameters) are never read from storage, and nothing is gathered onto one device.

Where the arrays go (`sharding`):
  * `None`: host memory, numpy arrays (export, and the single-device pipeline, which puts them on its device);
  * a `jax.sharding.Sharding` (e.g. `NamedSharding(mesh, P())`, replicated over the devices evaluation runs on):
    every restored leaf is laid out with it, read straight from storage onto those devices.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.paths import absolute, as_path
from sketchcomp_jax.train.state import merge_params

# The TrainState fields a parameter-only restore may read (never `opt_state`).
PARAM_FIELDS = ("step", "trainable", "frozen", "ema", "ema_updates")


class TrainingParams(NamedTuple):
    config: ModelConfig
    params: dict[str, Any]  # {'unet', 'vae', 'conditioner'}
    ema: dict[str, Any] | None  # {'unet': EMA U-Net, 'num_updates': int (when saved)} or None
    step: int


def state_metadata(state_dir: str | os.PathLike) -> dict[str, Any]:
    """The saved TrainState's tree of array metadata (shape, dtype per leaf), read without any array data."""
    with ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(state_dir)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    return dict(tree)


def _is_meta(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def restore_param_subtrees(state_dir: str | os.PathLike, want: dict[str, Any], sharding: Any = None) -> dict[str, Any]:
    """Restores the parts of a saved TrainState named by `want` and nothing else.

    `want` mirrors the state's top level with `True` for a whole field (`{'frozen': True}`) or a nested
    dict selecting sub-keys (`{'ema': {'unet': True}}`). Leaves come back as numpy arrays (`sharding=None`)
    or `jax.Array`s laid out with `sharding`. Raises KeyError naming a requested part the checkpoint lacks.
    """
    if set(want) - set(PARAM_FIELDS):
        raise ValueError(f"parameter-only restores read only {PARAM_FIELDS}, not {sorted(set(want) - set(PARAM_FIELDS))}")
    meta = state_metadata(state_dir)

    def select(tree, spec, where):
        if spec is True:
            return tree
        if not isinstance(tree, dict):
            raise KeyError(f"{where} is not a subtree in the checkpoint")
        out = {}
        for key, sub in spec.items():
            if key not in tree or tree[key] is None:
                raise KeyError(f"the checkpoint has no {where}{key}")
            out[key] = select(tree[key], sub, f"{where}{key}/")
        return out

    item_meta = select(meta, want, "")

    def target(m):
        if sharding is None:
            return np.empty(m.shape, m.dtype)  # only its type/shape/dtype are used
        return jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding)

    def restore_arg(m):
        if sharding is None:
            return ocp.RestoreArgs(restore_type=np.ndarray, dtype=m.dtype)
        return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=m.shape, dtype=m.dtype)

    item = jax.tree_util.tree_map(target, item_meta, is_leaf=_is_meta)
    restore_args = jax.tree_util.tree_map(restore_arg, item_meta, is_leaf=_is_meta)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(
            absolute(state_dir),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )


def read_model_config(workdir: str | os.PathLike) -> ModelConfig:
    path = absolute(workdir) / "model_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {workdir} is not a launch/train.py work directory")
    return ModelConfig.from_dict(json.loads(path.read_text()))


def load_training_params(workdir: str | os.PathLike, step: int, *, ema: str = "none",
                         sharding: Any = None) -> TrainingParams:
    """`(ModelConfig, params, EMA or None, step)` of the checkpoint `WORKDIR/checkpoints/<step>` without its
    optimizer state.

    `ema`: "none" (the raw weights only), "unet" (also the EMA U-Net, for `export --include_ema`: `ema` is
    `{'unet': …, 'num_updates': LitEma's counter}`, the counter when the run saved one), or "use" (the EMA U-Net *replaces* the raw one in `params`; the raw U-Net is not read).
    Asking for EMA of a run that kept none (`ema_decay` 0) gives `ema=None` ("unet") or a ValueError ("use").
    `sharding`: None for numpy host arrays, or a `jax.sharding.Sharding` for every leaf.
    """
    if ema not in ("none", "unet", "use"):
        raise ValueError(f"ema must be 'none', 'unet' or 'use', got {ema!r}")
    config = read_model_config(workdir)
    state_dir = absolute(workdir) / "checkpoints" / str(step) / "state"
    meta = state_metadata(state_dir)
    has_ema = isinstance(meta.get("ema"), dict) and "unet" in meta["ema"]
    if ema == "use" and not has_ema:
        raise ValueError(f"training run {workdir} kept no EMA weights (config.ema_decay was 0): use its raw weights (--weights raw)")
    want: dict[str, Any] = {"step": True, "frozen": True}
    if ema == "use":
        want["trainable"] = {k: True for k in meta["trainable"] if k != "unet"}
        want["ema"] = {"unet": True}
    else:
        want["trainable"] = True
        if ema == "unet" and has_ema:
            want["ema"] = {"unet": True}
            if _is_meta(meta.get("ema_updates")):
                want["ema_updates"] = True
    state = restore_param_subtrees(state_dir, want, sharding)
    trainable = dict(state["trainable"])
    ema_tree = state.get("ema")
    if ema == "use":
        trainable["unet"] = ema_tree["unet"]
        ema_tree = None
    elif ema_tree is not None and "ema_updates" in state:
        ema_tree = {**ema_tree, "num_updates": int(np.asarray(jax.device_get(state["ema_updates"])))}
    params = merge_params(trainable, state["frozen"])
    return TrainingParams(config, params, ema_tree, int(np.asarray(jax.device_get(state["step"]))))


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The committed checkpoint steps of a training work directory, ascending (Orbax's temporary
    `<step>.orbax-checkpoint-tmp-*` folders of a save in progress are not steps)."""
    ckpt_dir = as_path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())

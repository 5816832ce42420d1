"""Checks of a training config (`configs/*.py` plus `--config.KEY=VALUE` overrides) before anything is built.

`launch/train.py` runs `check_train_config` right after parsing: a typo'd value (a NaN learning rate, zero
steps, a missing `init_from` folder) is refused in a second with one line naming the key, instead of after
minutes of data preparation and compilation (or, for NaN, a run that trains on nothing). Only the keys the
training loop reads are checked; their meaning is in `configs/common.py`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

from sketchcomp_jax import paths
from sketchcomp_jax.cli_checks import UsageError


def _leaves(cfg: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    items = cfg.items() if hasattr(cfg, "items") else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            yield from _leaves(value, name + ".")
        else:
            yield name, value


def _get(cfg: Any, dotted: str) -> Any:
    value = cfg
    for part in dotted.split("."):
        value = value[part]
    return value


# (key, lowest, highest, lowest excluded, highest excluded); None = unbounded.
_RANGES = (
    ("total_steps", 1, None, False, False),
    ("batch_size", 1, None, False, False),
    ("log_every", 1, None, False, False),
    ("checkpoint_every", 1, None, False, False),
    ("max_to_keep", 1, None, False, False),
    ("sample_every", 0, None, False, False),
    ("sample_steps", 1, 1000, False, False),
    ("eval_every", 0, None, False, False),
    ("eval_batches", 0, None, False, False),
    ("uncond_prob", 0.0, 1.0, False, False),
    ("ema_decay", 0.0, 1.0, False, True),
    ("fit_vae_steps", 0, None, False, False),
    ("fit_vae_batch_size", 1, None, False, False),
    ("optim.lr", 0.0, None, True, False),
    ("optim.warmup_steps", 0, None, False, False),
    ("optim.b1", 0.0, 1.0, False, True),
    ("optim.b2", 0.0, 1.0, False, True),
    ("optim.eps", 0.0, None, True, False),
    ("optim.weight_decay", 0.0, None, False, False),
    ("optim.grad_clip_norm", 0.0, None, False, False),
    ("optim.grad_accum_steps", 1, None, False, False),
    ("data.synthetic_images", 0, None, False, False),
    ("data.worker_count", 0, None, False, False),
    ("data.arbitrary_mask_percent", 0.0, 1.0, False, False),
)


def check_train_config(cfg: Any, workdir: str) -> None:
    """Raises `UsageError` naming the first bad key: a non-finite float anywhere, a value outside its range,
    a missing `init_from` / data folder, or a `--workdir` that is a file."""
    for name, value in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--config.{name}={value} is not a finite number")
    for key, lo, hi, lo_open, hi_open in _RANGES:
        try:
            value = _get(cfg, key)
        except (KeyError, AttributeError):
            continue  # a config without this key uses the loop's default
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            raise UsageError(f"--config.{key}={value} is out of range: it must be in "
                             f"{left}{lo:g}, {'inf' if hi is None else format(hi, 'g')}{right}")
    dtype = cfg.get("compute_dtype", "float32")
    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--config.compute_dtype={dtype!r}: use float32 or bfloat16")
    init_from = cfg.get("init_from", "")
    if init_from and not paths.is_remote(init_from) and not os.path.isdir(os.path.expanduser(init_from)):
        raise UsageError(f"--config.init_from {init_from} is not a directory; give a model directory from "
                         "launch/convert.py")
    data = cfg.get("data", {})
    data_dir = data.get("dir", "")
    if not data_dir:
        raise UsageError("--config.data.dir is empty; give a dataset made by launch/prepare_data.py")
    if (not paths.is_remote(data_dir) and not data.get("synthetic_images", 0)
            and not os.path.isdir(os.path.expanduser(data_dir))):
        raise UsageError(f"--config.data.dir {data_dir} is not a directory; prepare it with launch/prepare_data.py "
                         "(or set --config.data.synthetic_images=N to make the synthetic set there)")
    if not paths.is_remote(workdir) and os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir} is a file; give a directory")

"""The one loader under `SketchCompositionPipeline.from_pretrained`: a model path → config + parameters.

A path may be

* a **model directory** (`launch/convert.py` output, or `workdir_to_model_dir` below): `DIR/config.json`
  + `DIR/params/`; it holds one set of U-Net weights (the raw or EMA copy chosen when it was made);
* a **training work directory** (`launch/train.py --workdir W`): `W/model_config.json` + `W/checkpoints/<step>/`.
  The latest step is used unless `step` is given; the raw U-Net unless `weights="ema"` (the EMA of a short run
  is still close to its initialisation). Only the parameters are read, never the optimizer state.

Sampling (`launch/sample.py`), the web UI, the notebook and evaluation all open a model with
`SketchCompositionPipeline.from_pretrained`, which calls `load_model_source`; this module never imports the
pipeline (the pipeline imports it).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any, NamedTuple

from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.paths import absolute, as_path, expand

log = logging.getLogger(__name__)

WEIGHTS = ("raw", "ema")  # which U-Net weights of a training run: the trained ones or their EMA copy


class ModelSource(NamedTuple):
    config: ModelConfig
    params: dict[str, Any]  # {'unet', 'vae', 'conditioner'}
    description: str  # e.g. "model directory runs/m" or "training run runs/demo, step 300 (weights)"


def is_model_dir(path: str | os.PathLike) -> bool:
    p = as_path(path)
    return (p / "config.json").is_file() and (p / "params").is_dir()


def is_training_workdir(path: str | os.PathLike) -> bool:
    p = as_path(path)
    return (p / "model_config.json").is_file() and (p / "checkpoints").is_dir()


def _not_a_model(path: pathlib.Path) -> ValueError:
    return ValueError(
        f"{path} is neither a model directory (config.json + params/, made by launch/convert.py) nor a "
        "training work directory (model_config.json + checkpoints/, made by launch/train.py); "
        "point it at one of those, e.g. train the demo with "
        "`python launch/train.py --config=configs/demo.py --workdir runs/demo`"
    )


def model_dir_weights(path: str | os.PathLike) -> str | None:
    """Which U-Net weights ('raw' or 'ema') a model directory holds, as its config.json records them
    (`launch/convert.py` and `workdir_to_model_dir` write the record); None when it does not say."""
    try:
        record = json.loads((as_path(path) / "config.json").read_text()).get("weights") or {}
    except (OSError, ValueError, AttributeError):
        return None  # an unreadable config.json is reported when the model is loaded
    held = record.get("unet_weights") if isinstance(record, dict) else None
    return held if held in WEIGHTS else None


def _check_model_dir_choice(p, step: int | None, weights: str | None) -> None:
    if step is not None:
        raise ValueError(f"{p} is a model directory (one set of weights): a step only applies to a training work "
                         "directory; drop the step")
    if weights is None:
        return
    held = model_dir_weights(p)
    if held is None:
        raise ValueError(f"{p} is a model directory that does not record whether it holds raw or EMA U-Net weights; "
                         "drop the weights choice (it holds one set)")
    if held != weights:
        raise ValueError(
            f"{p} is a model directory holding the {held} U-Net weights, not the {weights} ones; drop the weights "
            f"choice, or make a model directory with the {weights} weights (launch/convert.py --weights {weights}, "
            "or a training work directory)")


def load_model_source(path: str | os.PathLike, step: int | None = None, weights: str | None = None,
                      sharding: Any = None) -> ModelSource:
    """(ModelConfig, params, description) from a model directory or a training work directory.

    `weights`: "raw" or "ema" (None: a run's raw weights, or the one set a model directory holds). A training
    run's checkpoint is read parameters-only (`train/param_restore.py`): the U-Net (its EMA copy instead with
    "ema"), VAE and conditioner, never the optimizer state. `sharding` (a `jax.sharding.Sharding`, e.g.
    replicated over a mesh) lays every leaf out on the devices the caller runs on; None gives host numpy
    arrays for a training run and the first local device for a model directory.

    Raises FileNotFoundError for a missing path, ValueError for a folder that is neither kind, a run without
    checkpoints or the asked step, a `step` given with a model directory, or weights it does not hold.
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, not {weights!r}")
    p = expand(path)  # local or gs://
    if not p.exists():
        raise FileNotFoundError(
            f"model not found: {p}; give a model directory (launch/convert.py --out) or a training work "
            "directory (launch/train.py --workdir)"
        )
    if is_model_dir(p):
        _check_model_dir_choice(p, step, weights)
        from sketchcomp_jax.weights.model_dir import load_config, load_model

        shardings = None
        if sharding is not None:
            import jax

            from sketchcomp_jax.weights.convert import abstract_params

            shardings = jax.tree_util.tree_map(lambda _: sharding, abstract_params(load_config(p)))
        config, params = load_model(p, shardings)
        return ModelSource(config, params, f"model directory {p}")
    if is_training_workdir(p):
        from sketchcomp_jax.train.param_restore import load_training_params, saved_steps

        steps = saved_steps(p)
        if not steps:
            raise ValueError(f"training run {p} has no checkpoints yet ({p / 'checkpoints'} holds no step)")
        if step is not None and step not in steps:
            raise ValueError(f"step {step} not found in {p / 'checkpoints'}; available steps: {steps}")
        use_ema = weights == "ema"
        config, params, _, global_step = load_training_params(
            p, steps[-1] if step is None else step, ema="use" if use_ema else "none", sharding=sharding)
        kind = "EMA weights" if use_ema else "weights"
        return ModelSource(config, params, f"training run {p}, step {global_step} ({kind})")
    raise _not_a_model(p)


def is_text_conditioned(config: ModelConfig) -> bool:
    """True for the text+sketch baseline (prompt instead of a reference image)."""
    return getattr(config, "conditioning", "example") == "text"


def require_reference_model(config: ModelConfig, description: str) -> None:
    """The notebook and the web UI take a reference image: refuse the text-conditioned baseline clearly."""
    if is_text_conditioned(config):
        raise ValueError(
            f"{description} is the text-conditioned baseline (a prompt instead of a reference image); the "
            "notebook and the web UI need a reference-conditioned model (Paint-by-Example / Paint-by-Sketch); "
            "sample it with launch/sample.py --prompt"
        )


def workdir_to_model_dir(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    weights: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves a training run's weights (`weights`: "raw", the default, or "ema") as a model directory (what
    `launch/sample.py --model` reads); its config.json records which U-Net weights it holds."""
    from sketchcomp_jax.weights.model_dir import model_tokenizer_dir, save_model_dir

    if not is_training_workdir(workdir):
        raise ValueError(
            f"{workdir} is not a training work directory (expected model_config.json and checkpoints/ written "
            "by launch/train.py)"
        )
    config, params, description = load_model_source(workdir, step, weights)
    source = {"format": "training-workdir", "path": os.fspath(absolute(workdir)), "description": description,
              "weights": {"unet_weights": weights or "raw", "reason": f"the {description}"}}
    # A text-conditioned run keeps its tokenizer in the work directory; the model directory gets a copy.
    return save_model_dir(out, config, params, source, overwrite=overwrite,
                          tokenizer_dir=model_tokenizer_dir(workdir, config))

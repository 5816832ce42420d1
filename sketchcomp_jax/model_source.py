"""One entry point for "the model" in user-facing tools: a model directory *or* a training work directory.

The notebook and the web UI take a single path. It may be

* a **model directory** (`launch/convert.py` output, or `workdir_to_model_dir` below): `DIR/config.json`
  + `DIR/params/`;
* a **training work directory** (`launch/train.py --workdir W`): `W/model_config.json` + `W/checkpoints/<step>/`.
  The latest step is used unless `step` is given; the raw (not EMA) weights unless `use_ema=True`
  (the EMA of a short run is still close to its initialisation).
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, NamedTuple

from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.paths import absolute, as_path, expand

log = logging.getLogger(__name__)


class ModelSource(NamedTuple):
    config: ModelConfig
    params: dict[str, Any]
    description: str  # e.g. "model directory runs/m" or "training run runs/demo, step 300"


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


def load_model_source(path: str | os.PathLike, step: int | None = None, use_ema: bool = False,
                      sharding: Any = None) -> ModelSource:
    """(ModelConfig, params, description) from a model directory or a training work directory.

    A training run's checkpoint is read parameters-only (`train/param_restore.py`): the U-Net, VAE and
    conditioner (the EMA U-Net instead of the raw one with `use_ema`), never the optimizer state.
    `sharding` (a `jax.sharding.Sharding`, e.g. replicated over a mesh) lays every leaf out on the devices
    the caller runs on; None gives host numpy arrays for a training run and the first local device for a
    model directory (as `weights.model_dir.load_model`).

    Raises FileNotFoundError for a missing path, ValueError for a folder that is neither kind, for a run
    without checkpoints or the asked step, or for `step`/`use_ema` given with a model directory.
    """
    p = expand(path)  # local or gs://
    if not p.exists():
        raise FileNotFoundError(
            f"model not found: {p}; give a model directory (launch/convert.py --out) or a training work "
            "directory (launch/train.py --workdir)"
        )
    if is_model_dir(p):
        if step is not None or use_ema:
            raise ValueError(f"{p} is a model directory: step/use_ema only apply to a training work directory")
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
            "notebook and the web UI need a reference-conditioned model (Paint-by-Example / Paint-by-Sketch)"
        )


def open_pipeline(path: str | os.PathLike, step: int | None = None, use_ema: bool = False):
    """A ready `SketchCompositionPipeline` from a model directory or a training work directory."""
    from sketchcomp_jax.pipeline import SketchCompositionPipeline, load_tokenizer

    config, params, description = load_model_source(path, step, use_ema)
    log.info("loaded %s", description)
    if is_text_conditioned(config) and (not is_model_dir(path) or step is not None or use_ema):
        # The text baseline also needs its tokenizer, which a model directory keeps beside the weights.
        raise ValueError(f"{description}: a text-conditioned model opens from a model directory only "
                         "(export the run with `workdir_to_model_dir` first)")
    return SketchCompositionPipeline(config, params, tokenizer=load_tokenizer(path, config))


def workdir_to_model_dir(
    workdir: str | os.PathLike,
    out: str | os.PathLike,
    step: int | None = None,
    use_ema: bool = False,
    overwrite: bool = False,
) -> pathlib.Path:
    """Saves a training run's weights as a model directory (what `launch/sample.py --model` reads)."""
    from sketchcomp_jax.weights.model_dir import model_tokenizer_dir, save_model_dir

    if not is_training_workdir(workdir):
        raise ValueError(
            f"{workdir} is not a training work directory (expected model_config.json and checkpoints/ written "
            "by launch/train.py)"
        )
    config, params, description = load_model_source(workdir, step, use_ema)
    source = {"format": "training-workdir", "path": os.fspath(absolute(workdir)), "description": description}
    # A text-conditioned run keeps its tokenizer in the work directory; the model directory gets a copy.
    return save_model_dir(out, config, params, source, overwrite=overwrite,
                          tokenizer_dir=model_tokenizer_dir(workdir, config))

"""`sketchcomp_jax.model_source`: one path → a pipeline, for a model directory or a training work directory.

The training work directory is written with the trainer's own pieces (`create_train_state`, the Orbax
`Checkpointer`, `model_config.json`) around the tiny fixture model, so it has exactly the layout
`launch/train.py` leaves, without paying for a training run's compilation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sketchcomp_jax.model_source import (is_model_dir, is_training_workdir, load_model_source, open_pipeline,
                                         workdir_to_model_dir)

STEP = 7


def assert_same_tree(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def workdir(tiny_model, tmp_path_factory):
    from sketchcomp_jax.train.checkpointing import Checkpointer
    from sketchcomp_jax.train.state import create_train_state

    config, params = tiny_model
    state = create_train_state(params, optax.adam(1e-4), use_ema=True)
    # A recognisable EMA (half the weights) and step, to see which weights are read.
    state = state.replace(step=jnp.asarray(STEP, jnp.int32), ema=jax.tree_util.tree_map(lambda x: x * 0.5, state.ema))
    wd = tmp_path_factory.mktemp("run")
    (wd / "model_config.json").write_text(json.dumps(config.to_dict()))
    ckpt = Checkpointer(wd, async_save=False)
    ckpt.save(STEP, state, None, {"note": "test"}, force=True)
    ckpt.close()
    return wd


def test_kinds_are_recognised(tiny_model_dir, workdir, tmp_path):
    assert is_model_dir(tiny_model_dir) and not is_training_workdir(tiny_model_dir)
    assert is_training_workdir(workdir) and not is_model_dir(workdir)
    assert not is_model_dir(tmp_path) and not is_training_workdir(tmp_path)


def test_training_workdir_gives_the_trained_weights(tiny_model, workdir):
    _, params = tiny_model
    config, loaded, description = load_model_source(workdir)
    assert config.to_dict() == tiny_model[0].to_dict()
    assert_same_tree(loaded, params)
    assert f"step {STEP}" in description and "EMA" not in description
    _, ema_params, ema_description = load_model_source(workdir, use_ema=True)
    assert "EMA" in ema_description
    assert_same_tree(ema_params["unet"], jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, params["unet"]))
    assert_same_tree(ema_params["vae"], params["vae"])


def test_open_pipeline_from_either_kind(tiny_model, tiny_model_dir, workdir):
    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    for path in (tiny_model_dir, workdir):
        pipe = open_pipeline(path)
        assert isinstance(pipe, SketchCompositionPipeline)
        assert pipe.config.to_dict() == tiny_model[0].to_dict()
        assert_same_tree(pipe.params, tiny_model[1])


def test_workdir_to_model_dir_round_trip(tiny_model, workdir, tmp_path):
    out = workdir_to_model_dir(workdir, tmp_path / "exported")
    assert is_model_dir(out)
    config, params, description = load_model_source(out)
    assert description.startswith("model directory")
    assert_same_tree(params, tiny_model[1])
    source = json.loads((out / "source.json").read_text())
    assert source["format"] == "training-workdir" and f"step {STEP}" in source["description"]
    with pytest.raises(FileExistsError):
        workdir_to_model_dir(workdir, out)


def test_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a model directory"):
        load_model_source(tmp_path)
    with pytest.raises(ValueError, match="only apply to a training work directory"):
        load_model_source(tiny_model_dir, step=3)
    with pytest.raises(ValueError, match="not a training work directory"):
        workdir_to_model_dir(tiny_model_dir, tmp_path / "x")


def test_front_ends_refuse_the_text_baseline(tiny_model):
    import types

    from sketchcomp_jax.model_source import require_reference_model

    require_reference_model(tiny_model[0], "model directory m")  # a reference-conditioned model passes
    with pytest.raises(ValueError, match="text-conditioned baseline"):
        require_reference_model(types.SimpleNamespace(conditioning="text"), "model directory t")

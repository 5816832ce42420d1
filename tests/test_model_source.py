"""`SketchCompositionPipeline.from_pretrained` and the loader under it (`sketchcomp_jax.model_source`): one path → a
pipeline, for a model directory or a training work directory, parameters only.

The training work directory is written with the trainer's own pieces (`create_train_state`, the Orbax
`Checkpointer`, `model_config.json`) around the tiny fixture model, so it has exactly the layout
`launch/train.py` leaves, without paying for a training run's compilation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sketchcomp_jax.model_source import is_model_dir, is_training_workdir, load_model_source, workdir_to_model_dir
from sketchcomp_jax.pipeline import SketchCompositionPipeline

from tests.conftest import REPO_ROOT

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
    # A recognisable EMA (half the weights) and step, to see which weights are read; non-zero Adam moments
    # (fresh ones are zeros, which Orbax stores inline in its index rather than as data).
    rng = np.random.default_rng(0)
    opt_state = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        state.opt_state)
    state = state.replace(step=jnp.asarray(STEP, jnp.int32), ema=jax.tree_util.tree_map(lambda x: x * 0.5, state.ema),
                          opt_state=opt_state)
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
    _, ema_params, ema_description = load_model_source(workdir, weights="ema")
    assert "EMA" in ema_description
    assert_same_tree(ema_params["unet"], jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, params["unet"]))
    assert_same_tree(ema_params["vae"], params["vae"])


def test_from_pretrained_opens_either_kind(tiny_model, tiny_model_dir, workdir):
    for path in (tiny_model_dir, workdir):
        pipe = SketchCompositionPipeline.from_pretrained(path)
        assert pipe.config.to_dict() == tiny_model[0].to_dict()
        assert_same_tree(pipe.params, tiny_model[1])  # bit-identical to `load_model` of the model directory
    assert pipe.description.startswith("training run") and f"step {STEP}" in pipe.description


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
    # The EMA weights as a model directory: its config.json says so, and asking it for either set is checked.
    ema_dir = workdir_to_model_dir(workdir, tmp_path / "exported_ema", step=STEP, weights="ema")
    assert json.loads((ema_dir / "config.json").read_text())["weights"]["unet_weights"] == "ema"
    pipe = SketchCompositionPipeline.from_pretrained(ema_dir, weights="ema")
    assert_same_tree(pipe.params["unet"], jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, tiny_model[1]["unet"]))
    with pytest.raises(ValueError, match="holding the ema U-Net weights, not the raw ones"):
        SketchCompositionPipeline.from_pretrained(ema_dir, weights="raw")


def test_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="model not found"):
        load_model_source(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a model directory"):
        load_model_source(tmp_path)
    with pytest.raises(ValueError, match="a step only applies to a training work directory"):
        load_model_source(tiny_model_dir, step=3)
    with pytest.raises(ValueError, match="weights must be one of raw, ema"):
        load_model_source(tiny_model_dir, weights="best")
    # The fixture model directory was converted from a checkpoint without EMA buffers: it holds the raw U-Net.
    assert load_model_source(tiny_model_dir, weights="raw").description.startswith("model directory")
    with pytest.raises(ValueError, match="holding the raw U-Net weights, not the ema ones"):
        load_model_source(tiny_model_dir, weights="ema")
    with pytest.raises(ValueError, match="not a training work directory"):
        workdir_to_model_dir(tiny_model_dir, tmp_path / "x")


def test_front_ends_refuse_the_text_baseline(tiny_model):
    import types

    from sketchcomp_jax.model_source import require_reference_model

    require_reference_model(tiny_model[0], "model directory m")  # a reference-conditioned model passes
    with pytest.raises(ValueError, match="text-conditioned baseline"):
        require_reference_model(types.SimpleNamespace(conditioning="text"), "model directory t")


# ---------------------------------------------------------------------------------- parameter-only restores


def _corrupt_optimizer_state(state_dir):
    """Overwrites, in place, the stored bytes of every optimizer-state array (Adam's moments) with garbage.

    Orbax writes the arrays into a few shared OCDBT data files; the OCDBT index (read with tensorstore's
    `ocdbt.dump`) says where each array chunk's bytes lie (`value::d/<file>:<offset>:<length>`). Returns the
    number of bytes overwritten."""
    import tensorstore as ts

    damaged = 0
    for db in sorted(state_dir.glob("ocdbt.process_*")):
        kv = ts.KvStore.open(f"file://{db}/").result()
        version = ts.ocdbt.dump(kv).result()["versions"][-1]
        assert version["root_height"] == 0, "the tiny model's index is one B-tree node"
        for entry in ts.ocdbt.dump(kv, version["root"]["location"]).result()["entries"]:
            if entry["key"].startswith(b"opt_state.") and "indirect_value" in entry:
                file, offset, length = entry["indirect_value"][len("value::"):].rsplit(":", 2)
                with open(db / file, "r+b") as f:
                    f.seek(int(offset))
                    f.write(b"\xff" * int(length))
                damaged += int(length)
    return damaged


@pytest.fixture(scope="module")
def damaged_workdir(workdir, tmp_path_factory):
    """A copy of `workdir` whose optimizer state is unreadable: proves a restore never reads it."""
    import shutil

    wd = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(workdir, wd)
    state_dir = wd / "checkpoints" / str(STEP) / "state"
    assert _corrupt_optimizer_state(state_dir) > 2 * 4 * 100_000  # ~2x the trainable params' bytes
    return wd


def test_the_damage_is_real(damaged_workdir):
    """A full restore of the damaged checkpoint (what the tools did before) fails on the optimizer state."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr, pytest.raises(Exception):
        ckptr.restore(damaged_workdir / "checkpoints" / str(STEP) / "state")


def test_parameter_only_restore_skips_the_optimizer_state(tiny_model, damaged_workdir):
    from sketchcomp_jax.train.param_restore import load_training_params

    _, params = tiny_model
    config, loaded, ema, step = load_training_params(damaged_workdir, STEP, ema="unet")
    assert step == STEP and set(ema) <= {"unet", "num_updates"}  # num_updates: LitEma's counter
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(loaded))  # host memory
    assert_same_tree(loaded, params)  # bit-identical to the weights that were saved (= a full restore)
    assert_same_tree(ema["unet"], jax.tree_util.tree_map(lambda x: np.asarray(x) * 0.5, params["unet"]))
    # Laid out over the 8 devices evaluation runs on instead: replicated, the EMA U-Net in place of the raw one.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, sharded, _, _ = load_training_params(damaged_workdir, STEP, ema="use", sharding=replicated)
    leaf = jax.tree_util.tree_leaves(sharded)[0]
    assert leaf.sharding == replicated and len(leaf.devices()) == len(jax.devices())
    assert_same_tree(sharded["unet"], ema["unet"])
    assert_same_tree(sharded["vae"], params["vae"])


def test_tools_work_from_a_run_whose_optimizer_state_is_unreadable(tiny_model, workdir, damaged_workdir, tmp_path):
    """Sampling (`launch/sample.py`, the app, the notebook and evaluation open models with `from_pretrained`) and
    export read the damaged run; the export (with EMA) equals the intact run's byte for byte."""
    from sketchcomp_jax.weights.export import export

    pipe = SketchCompositionPipeline.from_pretrained(damaged_workdir, step=STEP)
    assert_same_tree(pipe.params, tiny_model[1])
    # Replicated over a mesh of the 8 (simulated) devices, as evaluation generates (a model directory: test_evaluate).
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = SketchCompositionPipeline.from_pretrained(damaged_workdir, sharding=replicated)
    assert {leaf.sharding for leaf in jax.tree_util.tree_leaves(sharded.params)} == {replicated}
    assert_same_tree(sharded.params, tiny_model[1])
    image = np.full((64, 64, 3), 128, np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    result = pipe(image, mask, None, image, steps=1, sampler="ddim")
    assert result.images01.shape == (1, 64, 64, 3) and np.isfinite(result.images01).all()
    damaged = export(tmp_path / "damaged.safetensors", "safetensors", workdir=damaged_workdir, include_ema=True)
    intact = export(tmp_path / "intact.safetensors", "safetensors", workdir=workdir, include_ema=True)
    assert damaged[0].read_bytes() == intact[0].read_bytes()


# ---------------------------------------------------------------------------------- the command-line tools


def _tool(script, *args, cwd=None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)


def test_sample_cli_opens_a_run_at_a_step_with_its_ema_weights(damaged_workdir, e2e, tmp_path):
    """`sample.py --step --weights ema` on a run whose optimizer state is unreadable gives, pixel for pixel, what
    `from_pretrained(run, step, weights="ema")` gives in Python (the raw weights, 2x the EMA ones here, would differ)."""
    from PIL import Image

    out = tmp_path / "out.png"
    args = ["--image", "image.png", "--mask", "mask.png", "--sketch", "sketch.png", "--reference", "reference.png",
            "--steps", "1", "--sampler", "ddim", "--vae_encode", "mean", "--noise", "noise.npy"]
    proc = _tool("sample.py", "--model", damaged_workdir, "--step", STEP, "--weights", "ema", "--out", out, *args,
                 cwd=e2e)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kw = dict(steps=1, sampler="ddim", vae_encode="mean", noise=np.load(e2e / "noise.npy"))
    inputs = [e2e / n for n in ("image.png", "mask.png", "sketch.png", "reference.png")]
    ema = SketchCompositionPipeline.from_pretrained(damaged_workdir, step=STEP, weights="ema")
    assert ema.description.endswith(f"step {STEP} (EMA weights)")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), np.asarray(ema(*inputs, **kw).images[0]))


def test_cli_model_choices_are_one_line_errors(tiny_model_dir, tmp_path):
    cases = [
        (("sample.py", "--model", tiny_model_dir, "--step", 3, "--image", "x.png", "--mask", "x.png",
          "--reference", "x.png", "--out", tmp_path / "o.png"), "--step only applies to a training work directory"),
        (("app.py", "--model", tiny_model_dir, "--use_ema", "--weights", "raw"), "contradict each other"),
        (("app.py", "--model", tmp_path / "missing"), "not a directory"),
    ]
    for args, message in cases:
        proc = _tool(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])

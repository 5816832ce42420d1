"""EMA weights as the original loads and trains them.

Conversion: an LDM checkpoint with LitEma buffers (`model_ema.diffusion_model<name without dots>`,
`model_ema.decay`, `model_ema.num_updates`) converts to the EMA U-Net when the YAML says `use_ema: True`
or omits it (LDM's `DDPM` default), to the raw U-Net with `use_ema: False`, and `--weights raw|ema`
overrides; checked by exporting the model directory back to `--format ldm` and comparing tensors
(exact: conversion and export only transpose float32 arrays).
Training: `lit_ema_update` is LitEma's formula, and the train step moves the EMA once per optimizer
step under gradient accumulation.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from sketchcomp_jax.weights.convert import CheckpointMismatchError, select_unet_weights
from sketchcomp_jax.weights.keymap import UNET_PREFIX, ema_key, ldm_key_from_ema, unet_entries
from sketchcomp_jax.weights.model_dir import save_model_dir
from sketchcomp_jax.weights.sources import convert_checkpoint

from tests.conftest import REPO_ROOT

DECAY, NUM_UPDATES = 0.9995, 1234


@pytest.fixture(scope="module")
def ema_ckpt(fixtures_dir, tmp_path_factory):
    """The tiny PbS checkpoint as a torch `.ckpt` with planted LitEma buffers (EMA = 0.5·raw + 0.25,
    so every EMA tensor differs from its raw tensor), plus three YAML variants."""
    import torch

    raw = load_file(fixtures_dir / "pbs_tiny.safetensors")
    sd = dict(raw)
    ema = {k: (0.5 * v + 0.25).astype(np.float32) for k, v in raw.items() if k.startswith(UNET_PREFIX)}
    for k, v in ema.items():
        sd[ema_key(k)] = v
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    tensors["model_ema.decay"] = torch.tensor(DECAY, dtype=torch.float32)
    tensors["model_ema.num_updates"] = torch.tensor(NUM_UPDATES, dtype=torch.int32)
    d = tmp_path_factory.mktemp("ema")
    path = d / "ema_tiny.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7}, path)
    text = (fixtures_dir / "pbs_tiny.yaml").read_text()
    assert "use_ema: False" in text
    yamls = {
        "false": d / "use_ema_false.yaml",
        "true": d / "use_ema_true.yaml",
        "omitted": d / "use_ema_omitted.yaml",
    }
    yamls["false"].write_text(text)
    yamls["true"].write_text(text.replace("use_ema: False", "use_ema: True"))
    yamls["omitted"].write_text("\n".join(line for line in text.splitlines() if "use_ema" not in line) + "\n")
    return path, yamls, raw, ema


def _unet_of(state_dict):
    return {k: np.asarray(v) for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}


def _assert_unet_is(exported, expected):
    assert sorted(exported) == sorted(expected)
    for k, v in expected.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


@pytest.mark.parametrize(
    "yaml_kind, weights, want",
    [
        ("true", None, "ema"),
        ("false", None, "raw"),
        ("false", "ema", "ema"),
        ("true", "raw", "raw"),
    ],
)
def test_unet_weights_follow_use_ema_and_the_override(ema_ckpt, fixtures_dir, yaml_kind, weights, want):
    """Converted params → the LDM export's state dict (in memory; the file round trip is the next test)."""
    from sketchcomp_jax.weights.export import ldm_state_dict

    path, yamls, raw, ema = ema_ckpt
    model, source = convert_checkpoint(
        path, yamls[yaml_kind], fixtures_dir / "pbs_tiny_clip_config.json", 64, weights=weights
    )
    exported = ldm_state_dict(model.config, model.params)
    _assert_unet_is(_unet_of(exported), ema if want == "ema" else _unet_of(raw))
    assert source["weights"]["unet_weights"] == want
    # Only the U-Net has an EMA copy: everything else is the checkpoint's.
    np.testing.assert_array_equal(exported["proj_out.weight"], raw["proj_out.weight"])


def test_use_ema_omitted_converts_to_ema_and_exports_it(ema_ckpt, fixtures_dir, tmp_path):
    """The default path end to end: YAML without use_ema (LDM default True) → model directory whose
    config.json records the choice → `export --format ldm` file → the EMA tensors."""
    from sketchcomp_jax.weights.export import export
    from sketchcomp_jax.weights.readers import read_state_dict

    path, yamls, raw, ema = ema_ckpt
    model, source = convert_checkpoint(path, yamls["omitted"], fixtures_dir / "pbs_tiny_clip_config.json", 64)
    model_dir = save_model_dir(tmp_path / "model", model.config, model.params, source)
    record = json.loads((model_dir / "config.json").read_text())["weights"]
    assert record["unet_weights"] == "ema" and "use_ema not set" in record["reason"]
    assert record["ema_num_updates"] == NUM_UPDATES and record["ema_decay"] == pytest.approx(DECAY)
    written = export(tmp_path / "back.ckpt", "ldm", model_dir=model_dir)
    back = read_state_dict(written[0])
    _assert_unet_is(_unet_of(back), ema)
    assert not any(k.startswith("model_ema.") for k in back)


def test_ema_only_checkpoint_converts_with_ema(ema_ckpt, fixtures_dir, tmp_path):
    path, yamls, raw, ema = ema_ckpt
    sd = {k: v for k, v in raw.items() if not k.startswith(UNET_PREFIX)}
    sd.update({ema_key(k): v for k, v in ema.items()})
    sd_ema_only, record = select_unet_weights(sd, None, False)
    assert record["unet_weights"] == "ema" and "only EMA" in record["reason"]
    for k, v in ema.items():
        np.testing.assert_array_equal(sd_ema_only[k], v)
    with pytest.raises(CheckpointMismatchError, match="only EMA weights.*--weights ema"):
        select_unet_weights(sd, "raw")


def test_ema_requested_without_ema_buffers_is_one_line_error(fixtures_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "convert.py"), "--src", str(fixtures_dir / "pbs_tiny.ckpt"),
         "--ldm_config", str(fixtures_dir / "pbs_tiny.yaml"), "--clip_config",
         str(fixtures_dir / "pbs_tiny_clip_config.json"), "--resolution", "64", "--weights", "ema",
         "--out", str(tmp_path / "m")],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "convert.py: error: --weights ema: the checkpoint has no EMA weights (no model_ema.* buffers); "
        "drop --weights or use --weights raw"
    ]
    assert not (tmp_path / "m").exists()


def test_incomplete_ema_set_is_refused(ema_ckpt):
    _, _, raw, ema = ema_ckpt
    sd = dict(raw)
    sd.update({ema_key(k): v for k, v in list(ema.items())[1:]})
    with pytest.raises(CheckpointMismatchError, match="without an EMA copy.*--weights raw"):
        select_unet_weights(sd, "ema")


def test_ema_names_invert_for_every_sd_unet_key():
    from sketchcomp_jax.models.config import ModelConfig

    keys = [e.ldm_key for e in unet_entries(ModelConfig())]
    assert len(keys) == 686
    # Two-digit block indices followed by one-digit layer indices are the ambiguous case.
    assert ldm_key_from_ema("model_ema.diffusion_modelinput_blocks110in_layers0weight") == (
        "model.diffusion_model.input_blocks.11.0.in_layers.0.weight"
    )
    assert all(ldm_key_from_ema(ema_key(k)) == k for k in keys)
    assert ldm_key_from_ema("model_ema.somethingelse") is None


# --------------------------------------------------------------------------------------------------
# Training EMA
# --------------------------------------------------------------------------------------------------


def _reference_lit_ema(shadow, params_seq, decay):
    """The original's LitEma.forward, step by step, in numpy (num_updates starts at 0)."""
    shadow = np.array(shadow, np.float64)
    n = 0
    for p in params_seq:
        n += 1
        d = min(decay, (1 + n) / (10 + n))
        shadow = shadow - (1.0 - d) * (shadow - p)
    return shadow, n


def test_lit_ema_update_is_the_original_formula():
    from sketchcomp_jax.train.state import lit_ema_update

    rng = np.random.default_rng(0)
    shadow0 = rng.normal(size=(5,)).astype(np.float32)
    seq = [rng.normal(size=(5,)).astype(np.float32) for _ in range(30)]
    ema, n = {"w": jnp.asarray(shadow0)}, jnp.zeros((), jnp.int32)
    for p in seq:
        ema, n = lit_ema_update(ema, {"w": jnp.asarray(p)}, n, 0.9)
    want, want_n = _reference_lit_ema(shadow0, seq, 0.9)
    assert int(n) == want_n
    np.testing.assert_allclose(np.asarray(ema["w"]), want, rtol=1e-5, atol=1e-6)  # fp32 vs fp64 over 30 steps
    # apply=False leaves both unchanged.
    same, n2 = lit_ema_update(ema, {"w": jnp.zeros(5)}, n, 0.9, apply=jnp.asarray(False))
    np.testing.assert_array_equal(np.asarray(same["w"]), np.asarray(ema["w"]))
    assert int(n2) == int(n)


def test_ema_moves_once_per_optimizer_step_under_multisteps():
    """The step's EMA rule (`optimizer_step_taken` + `lit_ema_update`) with the trainer's optimizer and
    grad_accum_steps=3 on a toy loss: the EMA and its counter move on every third micro-step only."""
    from sketchcomp_jax.train.state import lit_ema_update, make_optimizer, optimizer_step_taken

    optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                           grad_accum_steps=3))
    tx = make_optimizer(ml_collections.ConfigDict({"optim": optim}))
    params = {"w": jnp.arange(4.0)}
    opt_state, ema, n = tx.init(params), params, jnp.zeros((), jnp.int32)

    @jax.jit
    def step(params, opt_state, ema, n, target):
        grads = jax.grad(lambda p: jnp.sum((p["w"] - target) ** 2))(params)
        updates, new_opt = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema, n = lit_ema_update(ema, params, n, 0.999, optimizer_step_taken(opt_state, new_opt))
        return params, new_opt, ema, n

    shadow = np.arange(4.0)
    for micro in range(1, 10):
        params, opt_state, ema, n = step(params, opt_state, ema, n, jnp.float32(micro))
        if micro % 3 == 0:
            k = micro // 3
            d = min(0.999, (1 + k) / (10 + k))
            shadow = shadow - (1 - d) * (shadow - np.asarray(params["w"], np.float64))
        assert int(n) == micro // 3
        np.testing.assert_allclose(np.asarray(ema["w"]), shadow, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # compiles the tiny model's full train step (~2 min on 2 shared cores)
def test_train_step_updates_ema_once_per_optimizer_step(tiny_model):
    """Under grad_accum_steps=2 the EMA moves on micro-steps 2 and 4 only, with LitEma's warm-up decay
    computed from the EMA update count (1, 2), not the micro-step count."""
    from sketchcomp_jax.diffusion.schedule import schedule_for
    from sketchcomp_jax.models.config import build_networks
    from sketchcomp_jax.train.state import create_train_state, make_optimizer
    from sketchcomp_jax.train.step import make_step_fn

    config, params = tiny_model
    optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                           grad_accum_steps=2))
    tx = make_optimizer(ml_collections.ConfigDict({"optim": optim}))
    state = create_train_state(params, tx, use_ema=True)
    nets = build_networks(config)
    acp = jnp.asarray(schedule_for(config.schedule)["alphas_cumprod"], jnp.float32)
    decay = 0.99
    step = jax.jit(make_step_fn(nets, config, tx, acp, seed=0, ema_decay=decay))
    res = config.resolution
    rng = np.random.default_rng(0)
    batch = {
        "gt": jnp.asarray(rng.uniform(-1, 1, (1, res, res, 3)), jnp.float32),
        "keep_mask": jnp.ones((1, res, res, 1), jnp.float32).at[:, 16:48, 16:48].set(0.0),
        "sketch": -jnp.ones((1, res, res, 3), jnp.float32),
        "reference": jnp.asarray(rng.normal(size=(1, config.clip.image_size, config.clip.image_size, 3)), jnp.float32),
    }
    leaf = lambda tree: np.asarray(tree["unet"]["out_conv"]["bias"], np.float64)  # noqa: E731
    for micro in range(1, 5):
        before, shadow = leaf(state.trainable), leaf(state.ema)
        state, _ = step(state, batch)
        after = leaf(state.trainable)
        if micro % 2:
            np.testing.assert_array_equal(after, before)  # MultiSteps: no update on this micro-step
            np.testing.assert_array_equal(leaf(state.ema), shadow)
        else:
            assert not np.array_equal(after, before)
            n = micro // 2
            d = min(decay, (1 + n) / (10 + n))
            # fp32 update vs this fp64 formula: one rounding step apart.
            np.testing.assert_allclose(leaf(state.ema), shadow - (1 - d) * (shadow - after), rtol=1e-6, atol=1e-8)
        assert int(state.ema_updates) == micro // 2


def test_workdir_export_writes_litema_buffers_with_configured_decay(tiny_model, tmp_path):
    """`export --workdir --format ldm --include_ema`: `model_ema.*` in the original's layout, the run's
    `ema_decay` and the EMA update count (not the micro-step count)."""
    from sketchcomp_jax.train.checkpointing import Checkpointer
    from sketchcomp_jax.train.state import create_train_state
    from sketchcomp_jax.weights.export import export
    from sketchcomp_jax.weights.readers import read_state_dict

    config, params = tiny_model
    state = create_train_state(params, optax.adam(1e-4), use_ema=True)
    state = state.replace(step=jnp.asarray(10, jnp.int32), ema_updates=jnp.asarray(5, jnp.int32),
                          ema=jax.tree_util.tree_map(lambda x: x * 0.5, state.ema))
    (tmp_path / "model_config.json").write_text(json.dumps(config.to_dict()))
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(10, state, None, {"ema_decay": 0.995, "optim": {"grad_accum_steps": 2}}, force=True)
    ckpt.close()
    written = export(tmp_path / "out.ckpt", "ldm", workdir=tmp_path, include_ema=True)
    sd = read_state_dict(written[0])
    assert float(sd["model_ema.decay"]) == pytest.approx(0.995) and int(sd["model_ema.num_updates"]) == 5
    raw_unet = _unet_of(sd)
    ema_names = [k for k in sd if k.startswith("model_ema.diffusion_model")]
    assert sorted(ema_names) == sorted(ema_key(k) for k in raw_unet)
    for k, v in raw_unet.items():
        np.testing.assert_array_equal(sd[ema_key(k)], v * 0.5, err_msg=k)

"""The sharded train step: DP and FSDP on 8 simulated devices equal the single-device step."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sketchcomp_jax.diffusion.schedule import make_schedule
from sketchcomp_jax.models.config import build_networks
from sketchcomp_jax.parallel.mesh import make_mesh
from sketchcomp_jax.train.state import create_train_state, learning_rate_schedule, make_optimizer, split_params
from sketchcomp_jax.train.step import compile_step, make_step_fn


def optim_config(**kw):
    cfg = ml_collections.ConfigDict(dict(lr=1e-4, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
    cfg.update(kw)
    return ml_collections.ConfigDict({"optim": cfg})


def random_batch(n, rng=0):
    r = np.random.default_rng(rng)
    keep = np.ones((n, 64, 64, 1), np.float32)
    keep[:, 16:48, 8:40] = 0
    return {
        "gt": r.uniform(-1, 1, (n, 64, 64, 3)).astype(np.float32),
        "keep_mask": keep,
        "sketch": np.where(r.random((n, 64, 64, 3)) > 0.9, 1.0, -1.0).astype(np.float32),
        "reference": r.standard_normal((n, 32, 32, 3)).astype(np.float32),
    }


def run_steps(model, mesh, strategy, batches, min_size=256):
    config, params = model
    nets = build_networks(config)
    # Adam with eps 1e-8 turns near-zero gradient components into ±lr steps, so reduction-order noise
    # of ~1e-9 in a gradient could flip a whole update; a larger eps keeps the comparison about sharding.
    tx = make_optimizer(optim_config(eps=1e-3))
    acp = jnp.asarray(make_schedule()["alphas_cumprod"])
    gather = NamedSharding(mesh, P()) if strategy == "fsdp" else None
    step_fn = make_step_fn(nets, config, tx, acp, seed=0, gather_params=gather)
    state = create_train_state(jax.device_get(params), tx)
    shapes = {k: v.shape for k, v in batches[0].items()}
    compiled = compile_step(step_fn, jax.eval_shape(lambda: state), mesh, shapes, strategy, min_size)
    state = jax.device_put(state, compiled.state_shardings)
    losses = []
    for batch in batches:
        batch = {k: jax.device_put(v, compiled.batch_sharding) for k, v in batch.items()}
        state, metrics = compiled.fn(state, batch)
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return state, losses, compiled


@pytest.mark.slow  # three step compiles (~100 s); by default test_partitioning's fsdp x tensor run matches the single
# device and test_train_loop's restore trains on a data x fsdp mesh
def test_dp_and_fsdp_match_single_device(tiny_model):
    batches = [random_batch(8, i) for i in range(2)]
    single, l1, _ = run_steps(tiny_model, make_mesh({"data": 1}, devices=jax.devices()[:1]), "dp", batches)
    dp, l2, _ = run_steps(tiny_model, make_mesh({"data": -1}), "dp", batches)
    fsdp, l3, compiled = run_steps(tiny_model, make_mesh({"fsdp": -1}), "fsdp", batches)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    np.testing.assert_allclose(l3, l1, rtol=1e-5)
    # FSDP really shards: some U-Net kernels live split over the 8 devices.
    specs = [s.spec for s in jax.tree_util.tree_leaves(compiled.state_shardings.trainable)]
    assert any("fsdp" in tuple(spec) for spec in specs)
    for other in (dp, fsdp):
        for a, b in zip(jax.tree_util.tree_leaves(single.trainable), jax.tree_util.tree_leaves(other.trainable)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert int(fsdp.step) == 2


def test_frozen_parts_and_uncond_vector_do_not_change(tiny_model):
    config, params = tiny_model
    state, _, _ = run_steps(tiny_model, make_mesh({"data": 1}, devices=jax.devices()[:1]), "dp", [random_batch(2)])
    trainable, frozen = split_params(jax.device_get(params))
    assert "uncond_vector" in frozen["conditioner"] and "clip" in frozen["conditioner"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen)
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.trainable, trainable)
    assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_warmup_schedule_matches_the_original():
    sched = learning_rate_schedule(1e-5, 10000)
    assert float(sched(jnp.asarray(0))) == pytest.approx(1e-11)
    assert float(sched(jnp.asarray(5000))) == pytest.approx(1e-5 * (1e-6 + (1 - 1e-6) * 0.5))
    assert float(sched(jnp.asarray(20000))) == pytest.approx(1e-5)

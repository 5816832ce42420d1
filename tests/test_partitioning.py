"""Sharding rules by name (parallel/partitioning.py): coverage of the full-size model at pod fsdp sizes, computed
from abstract shapes (no devices), and the train step under the rules (fsdp × tensor, a spread leaf) on the 8
simulated CPU devices, equal to one device."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.parallel.mesh import make_mesh
from sketchcomp_jax.parallel.partitioning import (FSDP, compile_rules, fsdp_shards, fsdp_subaxes, leaf_layout,
                                                  parse_rule, path_string, replicated_bytes)
from sketchcomp_jax.train.state import create_train_state, make_optimizer
from sketchcomp_jax.weights.convert import abstract_params
from tests.test_train_step import optim_config, random_batch, run_steps

MIN_SIZE = 2**14


@pytest.fixture(scope="module")
def full_state():
    """The full-size TrainState (SD-v1 U-Net 12 ch, SD VAE, CLIP ViT-L/14, mapper), abstract."""
    tx = make_optimizer(ml_collections.ConfigDict({"optim": dict(lr=1e-5, warmup_steps=1, b1=0.9, b2=0.999,
                                                                 eps=1e-8, weight_decay=0.01)}))
    return jax.eval_shape(lambda p: create_train_state(p, tx), abstract_params(ModelConfig()))


@pytest.mark.parametrize("fsdp", [8, 64, 256])
def test_full_size_model_is_under_one_percent_replicated(full_state, fsdp):
    replicated, total, per_device = replicated_bytes((full_state.trainable, full_state.frozen), fsdp)
    assert total > 4 * 2**30  # really the full-size model (~4.9 GiB of float32 parameters)
    assert replicated / total < 0.01
    # what is not replicated is split exactly N ways: per-device bytes ≈ total/N + the small replicated leaves
    assert per_device <= total / fsdp + replicated + 1


def test_every_layout_divides_its_dimensions_and_keeps_the_old_choice(full_state):
    """JAX needs each dimension divisible by its shard count; where one dimension is divisible by N the leaf
    keeps the previous rule's layout (largest such dimension, later on ties), so existing runs are unchanged."""
    rules = compile_rules()
    for n in (8, 64, 256, 96):
        sizes = dict(fsdp_subaxes(n))
        for path, x in jax.tree_util.tree_leaves_with_path((full_state.trainable, full_state.frozen)):
            shape = tuple(x.shape)
            layout = leaf_layout(path_string(path), shape, n, 1, rules, MIN_SIZE)
            for dim, axes in zip(shape, layout):
                assert dim % math.prod(sizes[a] for a in axes) == 0, (path, shape, layout)
            divisible = [i for i, d in enumerate(shape) if d % n == 0]
            if math.prod(shape) >= MIN_SIZE and divisible:
                old = max(divisible, key=lambda i: (shape[i], i))
                assert set(layout[old]) == set(sizes) and fsdp_shards(layout, n) == n, (path, shape, layout)


def test_rules_by_name_user_rules_first_and_tensor_placement():
    rules = compile_rules([(r"unet/out_conv/kernel$", "replicated"), (r"in_conv/kernel$", "fsdp@-2")])
    conv = (3, 3, 640, 1280)
    # the user rule wins over the default 'fsdp'
    assert leaf_layout("unet/out_conv/kernel", conv, 8, 1, rules, MIN_SIZE) == ((), (), (), ())
    assert fsdp_shards(leaf_layout("unet/x/in_conv/kernel", conv, 8, 1, rules, MIN_SIZE), 8) == 8
    assert leaf_layout("unet/x/in_conv/kernel", conv, 8, 1, rules, MIN_SIZE)[2]  # fsdp@-2: the input channels
    assert leaf_layout("unet/x/out_conv/kernel", conv, 8, 1, rules, MIN_SIZE)[3]  # default: largest dimension
    # default tensor rules: q column-parallel, out row-parallel; tensor major within a dimension
    q = leaf_layout("unet/a/transformer_blocks_0/attn1/to_q/kernel", (640, 640), 4, 2, rules, MIN_SIZE)
    out = leaf_layout("unet/a/transformer_blocks_0/attn1/to_out/kernel", (640, 640), 4, 2, rules, MIN_SIZE)
    assert q[1][0] == "tensor" and out[0][0] == "tensor"
    assert fsdp_shards(q, 4) == 4 and fsdp_shards(out, 4) == 4
    # tensor = 1: no tensor axis anywhere, small leaves replicated
    assert "tensor" not in str(leaf_layout("unet/a/attn1/to_q/kernel", (640, 640), 4, 1, rules, MIN_SIZE))
    assert leaf_layout("unet/a/attn1/to_q/bias", (640,), 4, 2, rules, MIN_SIZE) == ((),)


def test_no_divisible_dimension_is_spread_over_several():
    """(3, 3, 640, 640) at fsdp=256: 640 = 2^7·5, so 128 shards on one dimension and 2 on the other."""
    layout = leaf_layout("unet/output_blocks_8_2/kernel", (3, 3, 640, 640), 256, 1, compile_rules(), MIN_SIZE)
    sizes = dict(fsdp_subaxes(256))
    assert sorted(math.prod(sizes[a] for a in d) for d in layout) == [1, 1, 2, 128]
    assert fsdp_shards(layout, 256) == 256


@pytest.mark.parametrize("rule", [("a", "b"), "ab", ("(", "fsdp"), ("x", "tensor"), ("x", "fsdp@z")])
def test_bad_rules_are_one_line_errors(rule):
    with pytest.raises(ValueError, match="mesh.rules entry") as info:
        parse_rule(rule)
    assert "\n" not in str(info.value)


def test_rule_naming_a_missing_dimension_says_which_leaf():
    with pytest.raises(ValueError, match=r"dimension -3 does not exist in unet/k of shape \(128, 256\)"):
        leaf_layout("unet/k", (128, 256), 8, 2, compile_rules([("unet/k", "tensor@-3")]), MIN_SIZE)


def run_with_rules(model, mesh, batches, rules):
    """`run_steps` of test_train_step with the FSDP strategy, user `rules` and the step's tensor-aware gather."""
    from sketchcomp_jax.diffusion.schedule import make_schedule
    from sketchcomp_jax.models.config import build_networks
    from sketchcomp_jax.train.step import compile_step, make_step_fn, step_gather

    config, params = model
    tx = make_optimizer(optim_config(eps=1e-3))  # as run_steps: a large eps keeps the comparison about sharding
    acp = jnp.asarray(make_schedule()["alphas_cumprod"])
    step_fn = make_step_fn(build_networks(config), config, tx, acp, seed=0,
                           gather_params=step_gather(mesh, "fsdp", 256, rules))
    state = create_train_state(jax.device_get(params), tx)
    shapes = {k: v.shape for k, v in batches[0].items()}
    compiled = compile_step(step_fn, jax.eval_shape(lambda: state), mesh, shapes, "fsdp", 256, rules)
    state = jax.device_put(state, compiled.state_shardings)
    losses = []
    for batch in batches:
        state, metrics = compiled.fn(state, {k: jax.device_put(v, compiled.batch_sharding) for k, v in batch.items()})
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return state, losses, compiled


def test_fsdp_with_tensor_axis_matches_single_device(tiny_model):
    """fsdp=4 × tensor=2: the default tensor rules (q/k/v, ff_in column-, to_out, ff_out row-parallel, weights
    gathered over fsdp only) plus a user rule that spreads the U-Net input conv (3,3,12,32) over two dimensions
    (the parameter mesh of fsdp sub-axes) give the single-device losses and weights (fp32 CPU, 1e-5: only the
    reduction order differs)."""
    from jax.sharding import NamedSharding

    from sketchcomp_jax.parallel.partitioning import parameter_mesh

    rules = ((r"unet/input_blocks_0/kernel$", "tensor@-2,fsdp@-2"),)
    batches = [random_batch(8, i) for i in range(2)]
    single, l1, _ = run_steps(tiny_model, make_mesh({"data": 1}, devices=jax.devices()[:1]), "dp", batches)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    tp, l2, compiled = run_with_rules(tiny_model, mesh, batches, rules)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(single.trainable), jax.tree_util.tree_leaves(tp.trainable)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    sh = compiled.state_shardings
    unet = sh.trainable["unet"]
    q = unet["input_blocks_1_1"]["transformer_blocks_0"]["attn1"]["to_q"]["kernel"]
    assert q.spec == jax.sharding.PartitionSpec(FSDP, "tensor")
    conv = unet["input_blocks_0"]["kernel"]
    assert conv.mesh == parameter_mesh(mesh) and conv.spec[2][0] == "tensor"  # tensor and an fsdp sub-axis
    # optimizer moments follow their parameters
    mu = [s for s in jax.tree_util.tree_leaves(sh.opt_state) if isinstance(s, NamedSharding)]
    assert any(s.spec == q.spec for s in mu) and any(s.mesh == conv.mesh and s.spec == conv.spec for s in mu)
    assert tp.trainable["unet"]["input_blocks_0"]["kernel"].sharding.spec == conv.spec
    assert int(tp.step) == 2

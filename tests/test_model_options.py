"""Module options (remat, compute dtype), input validation and the U-Net layout/heads rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sketchcomp_jax.models.config import ModelConfig, build_networks
from sketchcomp_jax.models.unet import AttnSpec, UNet, UNetConfig, count_params, unet_layout

TINY = UNetConfig(in_channels=12, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(1, 2), num_heads=2, context_dim=32)


@pytest.fixture(scope="module")
def tiny_unet_params():
    x = jnp.zeros((1, 8, 8, 12))
    return jax.jit(UNet(TINY).init)(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 32)))


def inputs(batch=2):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((batch, 8, 8, 12)), jnp.float32), jnp.array([5, 700][:batch]),
            jnp.asarray(rng.standard_normal((batch, 1, 32)), jnp.float32))


def test_remat_gives_identical_outputs_and_gradients(tiny_unet_params):
    x, t, c = inputs()

    def loss(params, module):
        return jnp.mean(module.apply(params, x, t, c) ** 2)

    plain, remat = UNet(TINY), UNet(TINY, remat=True)
    np.testing.assert_allclose(jax.jit(remat.apply)(tiny_unet_params, x, t, c), jax.jit(plain.apply)(tiny_unet_params, x, t, c),
                               rtol=1e-6, atol=1e-6)
    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_plain = grad(tiny_unet_params, plain)
    g_remat = grad(tiny_unet_params, remat)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g_plain, g_remat)
    # remat really re-computes: the backward pass of the remat model contains extra forward work.
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(tiny_unet_params, remat))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_bfloat16_compute_keeps_float32_params_and_stays_close(tiny_unet_params):
    x, t, c = inputs()
    ref = jax.jit(UNet(TINY).apply)(tiny_unet_params, x, t, c)
    out = jax.jit(UNet(TINY, dtype=jnp.bfloat16).apply)(tiny_unet_params, x, t, c)
    assert out.dtype == jnp.float32
    rel = float(jnp.abs(out - ref).max() / jnp.abs(ref).max())
    assert 0 < rel < 5e-2, rel
    shapes = jax.eval_shape(UNet(TINY, dtype=jnp.bfloat16).init, jax.random.PRNGKey(0), x, t, c)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_wrong_input_shapes_are_explained(tiny_unet_params):
    x, t, c = inputs()
    with pytest.raises(ValueError, match="12 channels, got shape"):
        UNet(TINY).apply(tiny_unet_params, x[..., :9], t, c)
    with pytest.raises(ValueError, match=r"context \(B, T, 32\)"):
        UNet(TINY).apply(tiny_unet_params, x, t, c[..., :16])
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(TINY).apply(tiny_unet_params, x[:, :7, :7], t, c)


def test_heads_follow_the_original_rules():
    sd1 = UNetConfig()
    layout = unet_layout(sd1)
    heads = {(s.channels, s.num_heads, s.dim_head) for b in layout.input_blocks for s in b.layers if isinstance(s, AttnSpec)}
    assert heads == {(320, 8, 40), (640, 8, 80), (1280, 8, 160)}
    sd2 = UNetConfig(num_heads=-1, num_head_channels=64, use_linear_projection=True, context_dim=1024)
    assert sd2.heads_for(640) == (10, 64)
    assert len(layout.input_blocks) == 12 and len(layout.output_blocks) == 12


def test_full_size_parameter_counts_from_shapes():
    """Counted abstractly (no allocation): SD-v1 U-Net with 12 / 9 input channels, as the spec gives."""
    for in_channels, expected in ((12, 859_544_004), (9, 859_535_364)):
        cfg = UNetConfig(in_channels=in_channels)
        shapes = jax.eval_shape(UNet(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, in_channels)),
                                jnp.zeros((1,), jnp.int32), jnp.zeros((1, 1, 768)))
        assert count_params(shapes) == expected


def test_full_size_conditioner_parameter_counts():
    nets = build_networks(ModelConfig())
    shapes = jax.eval_shape(nets.conditioner.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))["params"]
    mapper = sum(count_params(shapes[f"mapper_{i}"]) for i in range(5))
    assert mapper == 62_981_120
    assert count_params(shapes["final_ln"]) == 2048 and count_params(shapes["proj_out"]) == 787_200
    assert shapes["uncond_vector"].shape == (1, 1, 768)


def test_model_config_round_trips_through_json():
    import json

    cfg = ModelConfig(resolution=256)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    with pytest.raises(ValueError, match="not a sketchcomp-jax model config"):
        ModelConfig.from_dict({"unet": {}})

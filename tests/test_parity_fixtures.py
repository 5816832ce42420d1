"""Parity with the ORIGINAL PyTorch code, via the golden fixtures (tests/fixtures).

Tolerance: max |ours − golden| ≤ 1e-4 × max |golden| (fp32 on CPU; the goldens themselves move by
~1e-5 relative between 1 and 8 torch threads, see fixtures/README.md §8).
"""
import json

import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.models.config import build_networks
from sketchcomp_jax.models.layers import timestep_embedding
from sketchcomp_jax.models.unet import count_params
from sketchcomp_jax.models.vae import AutoencoderKL, DiagonalGaussian, decode_latent, encode_to_latent
from sketchcomp_jax.weights.sources import convert_checkpoint

REL_TOL = 1e-4


def nhwc(a):
    return np.asarray(a).transpose(0, 2, 3, 1)


def assert_close(ours, golden, rel=REL_TOL):
    ours, golden = np.asarray(ours), np.asarray(golden)
    assert ours.shape == golden.shape, (ours.shape, golden.shape)
    err = np.abs(ours - golden).max()
    scale = np.abs(golden).max()
    assert err <= rel * scale, f"max abs err {err:.3g} > {rel} × {scale:.3g}"
    return err


def test_config_matches_fixture_hyperparameters(tiny_model, fixtures_dir):
    ref = json.loads((fixtures_dir / "pbs_tiny_config.json").read_text())
    cfg = tiny_model.config
    assert cfg.unet.in_channels == 12 and cfg.unet.model_channels == 32
    assert cfg.unet.channel_mult == (1, 2) and cfg.unet.attention_resolutions == (1, 2)
    assert cfg.unet.num_heads == 2 and cfg.unet.context_dim == 32
    assert cfg.vae.ch_mult == (1, 2, 2) and cfg.vae.downsample_factor == 4
    assert cfg.clip.num_attention_heads == 2 and cfg.clip.image_size == 32
    assert cfg.latent_size == 16
    total = sum(count_params(p) for p in tiny_model.params.values())
    assert total == ref["num_parameters"]


def test_timestep_embedding_cos_first(fixtures_dir):
    io = np.load(fixtures_dir / "unet_io.npz")
    emb = timestep_embedding(jnp.asarray(io["timesteps"]), io["t_emb"].shape[1])
    assert_close(emb, io["t_emb"], rel=1e-5)


def test_unet_matches_original(tiny_model, fixtures_dir):
    io = np.load(fixtures_dir / "unet_io.npz")
    unet = build_networks(tiny_model.config).unet
    eps = unet.apply(
        {"params": tiny_model.params["unet"]}, jnp.asarray(nhwc(io["x"])), jnp.asarray(io["timesteps"]),
        jnp.asarray(io["context"]),
    )
    assert_close(eps, nhwc(io["eps"]))


def test_vae_matches_original(tiny_model, fixtures_dir):
    io = np.load(fixtures_dir / "vae_io.npz")
    vae = build_networks(tiny_model.config).vae
    params = tiny_model.params["vae"]
    moments = vae.apply({"params": params}, jnp.asarray(nhwc(io["image"])), method=AutoencoderKL.encode)
    assert_close(moments, nhwc(io["moments"]))
    posterior = DiagonalGaussian(moments)
    assert_close(posterior.mean, nhwc(io["mean"]))
    assert_close(posterior.std, nhwc(io["std"]))
    z = encode_to_latent(vae, params, jnp.asarray(nhwc(io["image"])))
    assert_close(z, nhwc(io["z"]))
    assert_close(decode_latent(vae, params, jnp.asarray(nhwc(io["z_given"]))), nhwc(io["decoded_given"]))
    assert_close(decode_latent(vae, params, jnp.asarray(nhwc(io["z"]))), nhwc(io["decoded_roundtrip"]))


def test_vae_posterior_sample_uses_std(tiny_model, fixtures_dir):
    import jax

    io = np.load(fixtures_dir / "vae_io.npz")
    posterior = DiagonalGaussian(jnp.asarray(nhwc(io["moments"])))
    rng = jax.random.PRNGKey(3)
    sample = posterior.sample(rng)
    noise = jax.random.normal(rng, posterior.mean.shape)
    np.testing.assert_allclose(sample, nhwc(io["mean"]) + nhwc(io["std"]) * noise, rtol=1e-6, atol=1e-6)


def test_conditioner_matches_original(tiny_model, fixtures_dir):
    io = np.load(fixtures_dir / "cond_io.npz")
    cond = build_networks(tiny_model.config).conditioner
    variables = {"params": tiny_model.params["conditioner"]}
    pixels = jnp.asarray(nhwc(io["pixel_values"]))
    hidden, pooled = cond.apply(variables, pixels, method=lambda m, x: m.clip(x))
    assert_close(hidden, io["last_hidden_state"])
    assert_close(pooled, io["pooler_output"])
    assert_close(cond.apply(variables, pixels), io["context"])
    uc = cond.apply(variables, 2, method=lambda m, b: m.unconditional(b))
    assert uc.shape == (2, 1, 32)
    np.testing.assert_array_equal(uc[0], io["learnable_vector"][0])


def test_safetensors_and_ckpt_give_identical_params(tiny_model, fixtures_dir):
    import jax

    model, _ = convert_checkpoint(
        fixtures_dir / "pbs_tiny.safetensors",
        ldm_config=fixtures_dir / "pbs_tiny.yaml",
        clip_config=fixtures_dir / "pbs_tiny_clip_config.json",
        resolution=64,
    )
    assert model.config == tiny_model.config
    jax.tree_util.tree_map(np.testing.assert_array_equal, model.params, jax.device_get(tiny_model.params))

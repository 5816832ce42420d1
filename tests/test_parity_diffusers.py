"""Parity with diffusers / transformers PyTorch models (random weights, tiny configs), loaded through
the diffusers-folder path of the converter. Tolerance: 1e-4 × output scale (fp32 CPU)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sketchcomp_jax.models.config import build_networks
from sketchcomp_jax.models.vae import AutoencoderKL
from sketchcomp_jax.weights.sources import convert_checkpoint

from tests.test_parity_fixtures import assert_close, nhwc
from tests.torch_reference import tiny_image_encoder, tiny_unet, tiny_vae, write_diffusers_folder


@pytest.fixture(scope="module")
def reference_models():
    return {"vae": tiny_vae(), "image_encoder": tiny_image_encoder()}


def convert_folder(tmp_path, unet, refs):
    folder = write_diffusers_folder(tmp_path / "pbe", unet, refs["vae"], refs["image_encoder"])
    model, source = convert_checkpoint(folder, resolution=32)
    assert source["format"] == "diffusers"
    return model


@pytest.mark.parametrize("in_channels,linear", [(9, False), (12, False), (12, True)])
def test_unet_matches_diffusers(tmp_path, reference_models, in_channels, linear):
    unet_t = tiny_unet(in_channels, linear=linear)
    model = convert_folder(tmp_path, unet_t, reference_models)
    assert model.config.unet.in_channels == in_channels
    assert model.config.unet.use_linear_projection == linear
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, in_channels, 8, 8, generator=gen)
    t = torch.tensor([3, 870])
    ctx = torch.randn(2, 1, 40, generator=gen)
    with torch.no_grad():
        ref = unet_t(x, t, encoder_hidden_states=ctx).sample.numpy()
    ours = build_networks(model.config).unet.apply(
        {"params": model.params["unet"]}, jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()), jnp.asarray(ctx.numpy())
    )
    assert_close(ours, nhwc(ref))


def test_vae_and_image_encoder_match_diffusers(tmp_path, reference_models):
    model = convert_folder(tmp_path, tiny_unet(9), reference_models)
    nets = build_networks(model.config)
    gen = torch.Generator().manual_seed(7)
    image = torch.rand(1, 3, 32, 32, generator=gen) * 2 - 1
    vae_t = reference_models["vae"]
    with torch.no_grad():
        moments = vae_t.encode(image).latent_dist.parameters.numpy()
        z = torch.randn(1, 4, 8, 8, generator=gen)
        decoded = vae_t.decode(z).sample.numpy()
    vae_params = {"params": model.params["vae"]}
    assert_close(nets.vae.apply(vae_params, jnp.asarray(nhwc(image.numpy())), method=AutoencoderKL.encode), nhwc(moments))
    assert_close(nets.vae.apply(vae_params, jnp.asarray(nhwc(z.numpy())), method=AutoencoderKL.decode), nhwc(decoded))

    enc_t = reference_models["image_encoder"]
    pixels = torch.randn(2, 3, 24, 24, generator=gen)
    with torch.no_grad():
        clip_out = enc_t.model(pixel_values=pixels)
        context, uncond = enc_t(pixels, return_uncond_vector=True)
    variables = {"params": model.params["conditioner"]}
    hidden, pooled = nets.conditioner.apply(variables, jnp.asarray(nhwc(pixels.numpy())), method=lambda m, x: m.clip(x))
    assert_close(hidden, clip_out.last_hidden_state.numpy())
    assert_close(pooled, clip_out.pooler_output.numpy())
    assert_close(nets.conditioner.apply(variables, jnp.asarray(nhwc(pixels.numpy()))), context.numpy())
    np.testing.assert_array_equal(model.params["conditioner"]["uncond_vector"], uncond.detach().numpy())

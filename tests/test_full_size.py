"""Full-size SD-v1 U-Net (860M parameters) against diffusers. Opt-in: `pytest -m slow`.

Needs ~14 GiB RAM and a few minutes on 2 CPU cores.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.models.unet import UNet, UNetConfig, count_params
from sketchcomp_jax.weights.convert import unet_params_from_diffusers
from sketchcomp_jax.weights.diffusers_config import unet_config_from_diffusers

from tests.test_parity_fixtures import assert_close, nhwc

SD_V1_12CH_PARAMS = 859_544_004


@pytest.mark.slow
def test_sd_v1_unet_full_size_parity():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet_t = UNet2DConditionModel(
        sample_size=64, in_channels=12, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2, cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval()
    cfg = unet_config_from_diffusers(unet_t.config)
    assert cfg == UNetConfig(in_channels=12)  # the released PbS U-Net config
    sd = {k: v.numpy() for k, v in unet_t.state_dict().items()}
    params = unet_params_from_diffusers(sd, ModelConfig(unet=cfg))
    assert count_params(params) == SD_V1_12CH_PARAMS

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 64, 64, generator=gen)
    t = torch.tensor([421])
    ctx = torch.randn(1, 1, 768, generator=gen)
    with torch.no_grad():
        ref = unet_t(x, t, encoder_hidden_states=ctx).sample.numpy()
    del unet_t
    ours = jax.jit(UNet(cfg).apply)({"params": params}, jnp.asarray(nhwc(x.numpy())), jnp.asarray(t.numpy()),
                                    jnp.asarray(ctx.numpy()))
    assert_close(np.asarray(ours), nhwc(ref))

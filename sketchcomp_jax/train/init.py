"""Initial model for training: a converted model directory (with channel surgery) or a random init."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.models.clip_vision import CLIPVisionConfig
from sketchcomp_jax.models.conditioner import MapperConfig
from sketchcomp_jax.models.config import ModelConfig, build_networks
from sketchcomp_jax.models.unet import UNetConfig
from sketchcomp_jax.models.vae import VAEConfig
from sketchcomp_jax.weights.convert import expand_input_channels
from sketchcomp_jax.weights.model_dir import load_model

log = logging.getLogger(__name__)


def model_config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """`cfg.model` (plain dict of sub-dicts, any missing field = SD v1 / ViT-L/14 default) → ModelConfig."""
    raw = dict(raw)
    kwargs = {}
    for name, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("clip", CLIPVisionConfig), ("mapper", MapperConfig)):
        if name in raw:
            kwargs[name] = cls(**dict(raw.pop(name)))
    return ModelConfig(**kwargs, **raw)


def random_params(config: ModelConfig, seed: int) -> dict[str, Any]:
    """A random init of every network (jitted: eager Flax init of a U-Net takes long)."""
    nets = build_networks(config)
    lat = config.latent_size
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    clip = config.clip

    @jax.jit
    def init():
        unet = nets.unet.init(keys[0], jnp.zeros((1, lat, lat, config.unet.in_channels)), jnp.zeros((1,), jnp.int32),
                              jnp.zeros((1, 1, config.context_dim)))["params"]
        size = 2 * config.vae.downsample_factor
        vae = nets.vae.init(keys[1], jnp.zeros((1, size, size, 3)))["params"]
        cond = nets.conditioner.init(keys[2], jnp.zeros((1, clip.image_size, clip.image_size, 3)))["params"]
        return {"unet": unet, "vae": vae, "conditioner": cond}

    return jax.device_get(init())


def initial_model(cfg) -> tuple[ModelConfig, dict[str, Any], str]:
    """(ModelConfig, params, description) per `cfg.init_from` / `cfg.model` / `cfg.in_channels`."""
    want_in = int(cfg.in_channels) if cfg.use_sketch else 9
    if cfg.init_from:
        config, params = load_model(cfg.init_from)
        params = jax.device_get(params)
        overrides = {k: v for k, v in dict(cfg.model).items() if k == "resolution"}
        if overrides:
            config = config.replace(**overrides)
        have = config.unet.in_channels
        if have != want_in:
            kernel = np.asarray(params["unet"]["input_blocks_0"]["kernel"])  # HWIO
            oihw = expand_input_channels(kernel.transpose(3, 2, 0, 1), want_in)
            params["unet"]["input_blocks_0"]["kernel"] = oihw.transpose(2, 3, 1, 0)
            config = config.replace(unet=dataclasses.replace(config.unet, in_channels=want_in))
            log.info("init: U-Net input channels %d → %d (zero-initialised)", have, want_in)
        return config, params, f"model directory {cfg.init_from}"
    config = model_config_from_dict(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model))
    if config.unet.in_channels != want_in:
        config = config.replace(unet=dataclasses.replace(config.unet, in_channels=want_in))
    return config, random_params(config, cfg.seed), "random init"

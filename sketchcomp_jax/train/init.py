"""Initial model for training: a converted model directory (with channel surgery) or a random init."""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.models.clip_text import CLIPTextConfig
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
    for name, cls in (("unet", UNetConfig), ("vae", VAEConfig), ("clip", CLIPVisionConfig), ("mapper", MapperConfig),
                      ("text", CLIPTextConfig)):
        if name in raw:
            kwargs[name] = cls(**dict(raw.pop(name)))
    return ModelConfig(**kwargs, **raw)


def text_tokenizer_dir(cfg) -> str | None:
    """The CLIP tokenizer folder of a text-conditioned run: `cfg.text.tokenizer`, else the dataset's own
    `tokenizer/` (the synthetic set ships one). None for the example-conditioned models."""
    if cfg.get("conditioning", "example") != "text":
        return None
    from sketchcomp_jax.paths import as_path

    folder = cfg.text.get("tokenizer", "") or os.fspath(as_path(cfg.data.dir) / "tokenizer")  # local or gs://
    if not (as_path(folder) / "vocab.json").is_file():
        raise FileNotFoundError(
            f"CLIP tokenizer not found at {folder}: set --config.text.tokenizer=DIR (a folder with vocab.json and "
            "merges.txt, e.g. openai/clip-vit-large-patch14 or an SD pipeline's tokenizer/)"
        )
    return folder


def _with_text_conditioner(cfg, config: ModelConfig, params: dict[str, Any]) -> tuple[ModelConfig, dict[str, Any]]:
    """Swaps the reference conditioner for the frozen CLIP text encoder of the T+S baseline: loaded from
    `cfg.text.encoder_from` (transformers folder / checkpoint); without it, kept when the model already is
    text-conditioned, else randomly initialised from `cfg.model.text` (tiny CPU configs). The unconditional
    context is set to the encoding of the empty prompt."""
    from sketchcomp_jax.models.clip_tokenizer import CLIPTokenizer
    from sketchcomp_jax.models.text_conditioner import empty_prompt_context

    tokenizer = CLIPTokenizer.from_folder(text_tokenizer_dir(cfg))
    if cfg.text.get("encoder_from", ""):
        from sketchcomp_jax.weights.clip_text_weights import load_clip_text

        text_config, text_params = load_clip_text(cfg.text.encoder_from)
        log.info("init: CLIP text encoder from %s", cfg.text.encoder_from)
    elif config.conditioning == "text":
        text_config, text_params = config.text, params["conditioner"]["text"]
    elif "text" in cfg.model:
        from sketchcomp_jax.models.clip_text import CLIPTextTower

        text_config = CLIPTextConfig(**dict(cfg.model["text"]))
        ids = jnp.zeros((1, text_config.max_position_embeddings), jnp.int32)
        init = jax.jit(lambda key: CLIPTextTower(text_config).init(key, ids)["params"])
        text_params = jax.device_get(init(jax.random.fold_in(jax.random.PRNGKey(int(cfg.seed)), 3)))
        log.info("init: random CLIP text tower (config.model.text)")
    else:
        raise ValueError("conditioning='text' from a reference-conditioned init_from needs --config.text.encoder_from "
                         "(a CLIP text encoder: transformers folder or checkpoint)")
    if len(tokenizer.vocab) > text_config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer.vocab)} tokens but the text encoder only "
                         f"{text_config.vocab_size}: they do not belong together")
    if text_config.hidden_size != config.unet.context_dim:
        raise ValueError(f"the text encoder's width {text_config.hidden_size} differs from the U-Net's context_dim "
                         f"{config.unet.context_dim}")
    uncond = empty_prompt_context(text_config, text_params, tokenizer(""))
    config = config.replace(conditioning="text", text=text_config, context_dim=text_config.hidden_size)
    params = {**params, "conditioner": {"text": text_params, "uncond_vector": uncond}}
    return config, params


def random_params(config: ModelConfig, seed: int) -> dict[str, Any]:
    """A random init of every network (jitted: eager Flax init of a U-Net takes long)."""
    nets = build_networks(config)
    lat = config.latent_size
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)

    @jax.jit
    def init():
        unet = nets.unet.init(keys[0], jnp.zeros((1, lat, lat, config.unet.in_channels)), jnp.zeros((1,), jnp.int32),
                              jnp.zeros((1, 1, config.context_dim)))["params"]
        size = 2 * config.vae.downsample_factor
        vae = nets.vae.init(keys[1], jnp.zeros((1, size, size, 3)))["params"]
        cond = nets.conditioner.init(keys[2], config.dummy_conditioning_input())["params"]
        return {"unet": unet, "vae": vae, "conditioner": cond}

    return jax.device_get(init())


def initial_model(cfg, fresh: bool = True) -> tuple[ModelConfig, dict[str, Any], str]:
    """(ModelConfig, params, description) per `cfg.init_from` / `cfg.model` / `cfg.in_channels` (and, for the
    text baseline, `cfg.conditioning` / `cfg.text`). `fresh=False` (resuming: the params will be replaced by
    a checkpoint's) skips the optional VAE fit of a random init."""
    config, params, source = _initial_model(cfg)
    if fresh and not cfg.init_from and int(cfg.get("fit_vae_steps", 0)) > 0:
        vae_params, scale_factor = _fitted_vae(cfg, config, params["vae"])
        params = {**params, "vae": vae_params}
        config = config.replace(scale_factor=scale_factor)
        source += f" (VAE fitted to the data for {int(cfg.fit_vae_steps)} steps, latent scale {scale_factor:.4g})"
    if cfg.get("conditioning", "example") == "text":
        config, params = _with_text_conditioner(cfg, config, params)
    return config, params, source


def _fitted_vae(cfg, config: ModelConfig, vae_params: Any) -> tuple[Any, float]:
    """A random tiny VAE fitted to the training images (see `train.autoencoder`), and its latent scale factor:
    1 / std of posterior samples (LDM's `scale_by_std`; SD's 0.18215 is that figure for SD's VAE), so that the
    diffusion model sees unit-variance latents. Every process reads the same batches (shard 0 of 1) so that
    all hosts end with the same weights."""
    from sketchcomp_jax.data.pipeline import make_train_loader
    from sketchcomp_jax.train.autoencoder import fit_autoencoder, latent_std

    loader = make_train_loader(cfg.data.dir, resolution=config.resolution, reference_size=config.clip.image_size,
                               global_batch_size=int(cfg.get("fit_vae_batch_size", 16)), seed=int(cfg.seed),
                               shard_index=0, shard_count=1, worker_count=int(cfg.data.worker_count))
    images = (batch["gt"] for batch in loader)
    vae = build_networks(config).vae
    params, losses = fit_autoencoder(vae, vae_params, images, int(cfg.fit_vae_steps), seed=int(cfg.seed))
    scale_factor = 1.0 / latent_std(vae, params, [next(images) for _ in range(4)], seed=int(cfg.seed))
    log.info("init: VAE fitted, L1 %.4f → %.4f; latent scale factor %.4g", float(np.mean(losses[:10])),
             float(np.mean(losses[-10:])), scale_factor)
    return params, scale_factor


def _initial_model(cfg) -> tuple[ModelConfig, dict[str, Any], str]:
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
    raw = cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model)
    if cfg.get("conditioning", "example") == "text" and "text" not in raw:
        raise ValueError("a randomly initialised text baseline needs --config.model.text (a CLIP text config)")
    if cfg.get("conditioning", "example") == "text":
        raw = {**raw, "conditioning": "text"}
    config = model_config_from_dict(raw)
    if config.unet.in_channels != want_in:
        config = config.replace(unet=dataclasses.replace(config.unet, in_channels=want_in))
    return config, random_params(config, cfg.seed), "random init"

"""One call from any supported weights source to `(ModelConfig, params)`.

Sources: an LDM `.ckpt` (Lightning dict or bare state dict), a `.safetensors` file in the LDM layout,
or a diffusers Paint-by-Example folder (`unet/`, `vae/`, `image_encoder/`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib

from sketchcomp_jax.models.clip_vision import CLIPVisionConfig
from sketchcomp_jax.weights.convert import (
    CHANNEL_NAMES,
    CONV_IN_KEY,
    CheckpointMismatchError,
    diffusers_to_ldm,
    ldm_to_params,
    normalize_clip_prefix,
    select_unet_weights,
)
from sketchcomp_jax.weights.diffusers_config import model_config_from_diffusers
from sketchcomp_jax.weights.infer import infer_model_config, ldm_use_ema, load_ldm_yaml
from sketchcomp_jax.weights.model_dir import LoadedModel
from sketchcomp_jax.weights.folders import read_diffusers_folder
from sketchcomp_jax.weights.readers import detect_format, read_state_dict

log = logging.getLogger(__name__)


def convert_checkpoint(
    src: str | os.PathLike,
    ldm_config: str | os.PathLike | None = None,
    clip_config: str | os.PathLike | None = None,
    resolution: int = 512,
    in_channels: int | None = None,
    weights: str | None = None,
    clip_from: str | os.PathLike | None = None,
    init_seed: int = 0,
) -> tuple[LoadedModel, dict]:
    """Reads `src` and returns the model plus a `source` record (for the model directory's source.json).

    Architecture comes from tensor shapes, then `ldm_config` (the original YAML) for what shapes
    cannot tell (heads), then `clip_config` (a transformers CLIPVisionConfig JSON), then the SD v1 /
    ViT-L/14 defaults. `in_channels` > the checkpoint's U-Net input channels appends zero channels.
    If the YAML declares more U-Net input channels than the checkpoint holds, `in_channels` must say
    so explicitly (the error says how). The U-Net weights are the checkpoint's EMA copy or its raw
    weights as `select_unet_weights` decides from the YAML's `use_ema` and `weights` ('raw' | 'ema');
    `source['weights']` records the choice.

    `clip_from` (a transformers CLIPVisionModel / CLIPModel folder or weights file) makes a Paint-by-Example
    initialisation from a Stable Diffusion v1 checkpoint, as the original does (`weights.pbe_init`): SD's U-Net
    and VAE, that CLIP vision tower, a fresh mapper / final LN / proj_out / unconditional vector (seeded by
    `init_seed`), and `in_channels` (default 9) zero-extended input channels. The U-Net then defaults to SD's
    raw weights, as PbE's `configs/v1.yaml` (`use_ema: False`) loads them.
    """
    src = pathlib.Path(src)
    fmt = detect_format(src)
    yaml_params = load_ldm_yaml(ldm_config) if ldm_config else None
    clip = CLIPVisionConfig.from_json(clip_config) if clip_config else None
    if clip_from is not None:
        if fmt == "diffusers":
            raise CheckpointMismatchError(
                "--clip_from needs a Stable Diffusion v1 checkpoint in the LDM layout (.ckpt / .safetensors), "
                "not a diffusers folder"
            )
        return _sd_to_pbe(src, fmt, ldm_config, yaml_params, clip_config, clip, resolution, in_channels,
                          weights, clip_from, init_seed)
    if fmt == "diffusers":
        components = read_diffusers_folder(src)
        config = model_config_from_diffusers(components, resolution=resolution)
        if clip is not None:
            config = config.replace(clip=clip)
        sd = diffusers_to_ldm({k: v["state_dict"] for k, v in components.items() if k != "model_index"}, config)
        # A diffusers folder has one U-Net; there is no EMA copy to choose.
        sd, weights_record = select_unet_weights(sd, weights)
    else:
        sd = normalize_clip_prefix(read_state_dict(src), "cond_stage_model.transformer.")
        sd, weights_record = select_unet_weights(sd, weights, ldm_use_ema(yaml_params))
        config = infer_model_config(sd, yaml_params, clip, resolution)
    log.info("U-Net weights: %s (%s)", weights_record["unet_weights"], weights_record["reason"])
    have = _ckpt_in_channels(sd)
    declared = yaml_params["unet_config"]["params"].get("in_channels") if yaml_params else None
    if in_channels is None and declared is not None and have is not None and declared != have:
        raise CheckpointMismatchError(
            f"--ldm_config declares a {declared}-channel U-Net but the checkpoint is a "
            f"{CHANNEL_NAMES.get(have, f'{have}-channel')} U-Net; pass --in_channels {declared} to add "
            f"zero-initialised channels (as the paper initialises), or use a {have}-channel config"
        )
    target = in_channels or have or config.unet.in_channels
    if target != config.unet.in_channels:
        config = config.replace(unet=dataclasses.replace(config.unet, in_channels=int(target)))
    params = ldm_to_params(sd, config)
    source = {
        "src": str(src.absolute()),
        "format": fmt,
        "ldm_config": str(ldm_config) if ldm_config else None,
        "clip_config": str(clip_config) if clip_config else None,
        "checkpoint_in_channels": have,
        "in_channels": config.unet.in_channels,
        "weights": weights_record,
    }
    return LoadedModel(config, params), source


def _ckpt_in_channels(sd) -> int | None:
    return int(sd[CONV_IN_KEY].shape[1]) if CONV_IN_KEY in sd else None


def _sd_to_pbe(src, fmt, ldm_config, yaml_params, clip_config, clip, resolution, in_channels, weights, clip_from,
               init_seed) -> tuple[LoadedModel, dict]:
    from sketchcomp_jax.weights.pbe_init import read_clip_vision, sd_to_pbe_state_dict

    sd = read_state_dict(src)
    use_ema = ldm_use_ema(yaml_params)
    sd, weights_record = select_unet_weights(sd, weights, False if use_ema is None else use_ema)
    if use_ema is None and weights is None and weights_record["unet_weights"] == "raw" and weights_record["ema_decay"] is not None:
        weights_record["reason"] = "Paint-by-Example's configs/v1.yaml (use_ema: False) loads SD's raw U-Net"
    log.info("U-Net weights: %s (%s)", weights_record["unet_weights"], weights_record["reason"])
    folder_clip, clip_sd = read_clip_vision(clip_from)
    if clip is not None and folder_clip is not None and clip != folder_clip:
        raise CheckpointMismatchError(f"--clip_config disagrees with {clip_from}/config.json; drop --clip_config")
    sd, init_record = sd_to_pbe_state_dict(sd, clip_sd, seed=init_seed)
    config = infer_model_config(sd, yaml_params, clip or folder_clip, resolution)
    have = _ckpt_in_channels(sd)
    declared = yaml_params["unet_config"]["params"].get("in_channels") if yaml_params else None
    target = int(in_channels or declared or 9)
    if have is not None and have != 4:
        raise CheckpointMismatchError(
            f"--clip_from expects a 4-channel Stable Diffusion U-Net, but {CONV_IN_KEY} has {have} input channels"
        )
    if target not in (9, 12):
        raise CheckpointMismatchError(
            f"--clip_from: --in_channels must be 9 (Paint-by-Example) or 12 (Paint-by-Sketch), not {target}"
        )
    config = config.replace(unet=dataclasses.replace(config.unet, in_channels=target))
    params = ldm_to_params(sd, config)
    source = {
        "src": str(pathlib.Path(src).absolute()),
        "format": fmt,
        "ldm_config": str(ldm_config) if ldm_config else None,
        "clip_config": str(clip_config) if clip_config else None,
        "clip_from": str(pathlib.Path(clip_from).absolute()),
        "checkpoint_in_channels": have,
        "in_channels": target,
        "weights": weights_record,
        "initialisation": init_record,
    }
    return LoadedModel(config, params), source

"""Flax params → the original `LatentDiffusion` state dict, and the original's YAML config + CLIP JSON.

Shared with `export_diffusers.py`: the export dtypes (`DTYPES`, `as_export_dtype`, `cast_to`), `param_leaf`
and `EmaWeights`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from sketchcomp_jax.diffusion.schedule import schedule_for
from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.weights.convert import _get_path, flax_to_torch
from sketchcomp_jax.weights.errors import ExportError
from sketchcomp_jax.weights.keymap import CLIP_PREFIX, UNET_PREFIX, ema_key, model_entries, unet_entries

DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
POSITION_IDS_KEY = f"{CLIP_PREFIX}embeddings.position_ids"


@dataclasses.dataclass(frozen=True)
class EmaWeights:
    """EMA copy of the U-Net (the original's `LitEma` tracks `model.diffusion_model` only).

    `unet` has the structure of `params['unet']`; `decay` / `num_updates` become the `model_ema.decay`
    (float32) and `model_ema.num_updates` (int32) buffers of the LDM checkpoint.
    """

    unet: Mapping[str, Any]
    decay: float = 0.9999
    num_updates: int = 0



# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def as_export_dtype(dtype: str | np.dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    dt = np.dtype(dtype)
    if dt not in DTYPES.values():
        raise ExportError(f"unsupported export dtype {dt}; choose one of {', '.join(DTYPES)}")
    return dt


def cast_to(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Floating arrays → `dtype` (round to nearest even); integer / bool arrays unchanged. Always a fresh,
    writable, C-contiguous array that owns its memory."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
        return np.array(a.astype(np.float32).astype(dtype), order="C")
    return np.array(a, order="C")


def param_leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
    try:
        return np.asarray(_get_path(params, path), np.float32)
    except (KeyError, TypeError):
        raise ExportError(f"params have no leaf {'/'.join(path)}: they do not match the model config") from None


def ldm_state_dict(
    config: ModelConfig, params: Mapping[str, Any], dtype: str | np.dtype = "float32", ema: EmaWeights | None = None
) -> dict[str, np.ndarray]:
    """Flax params → the original `LatentDiffusion.state_dict()` as numpy arrays.

    Keys, shapes and order follow the original: `learnable_vector`, the 12 DDPM buffers (recomputed from
    `config.schedule`, bit-identical to `register_schedule`), the U-Net, `proj_out`, the VAE, the CLIP
    vision tower, `final_ln`, the mapper, and the int64 `position_ids` buffer; with `ema`, also the
    `model_ema.*` buffers of `LitEma`. Floating tensors are cast to `dtype`; `position_ids` stays int64.
    """
    dt = as_export_dtype(dtype)
    weights = {e.ldm_key: (e, param_leaf(params, e.flax_path)) for e in model_entries(config)}
    sd: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray):
        sd[key] = cast_to(value, dt)

    def put_entry(key: str):
        entry, value = weights.pop(key)
        put(key, flax_to_torch(entry, value, entry.ldm_ndim))

    put_entry("learnable_vector")
    buffers = schedule_for(config.schedule)
    for name, value in buffers.items():
        put(name, value)
    unet_keys = [k for k in weights if k.startswith(UNET_PREFIX)]
    head = (f"{UNET_PREFIX}out.",)  # the original registers the output head last
    for key in [k for k in unet_keys if not k.startswith(head)] + [k for k in unet_keys if k.startswith(head)]:
        put_entry(key)
    put_entry("proj_out.weight")
    put_entry("proj_out.bias")
    for prefix in ("first_stage_model.", CLIP_PREFIX, "cond_stage_model.final_ln.", "cond_stage_model.mapper."):
        for key in [k for k in weights if k.startswith(prefix)]:
            put_entry(key)
    assert not weights, sorted(weights)
    sd[POSITION_IDS_KEY] = np.arange(config.clip.num_positions, dtype=np.int64)[None]
    if ema is not None:
        for entry in unet_entries(config):
            value = param_leaf({"unet": ema.unet}, entry.flax_path)
            put(ema_key(entry.ldm_key), flax_to_torch(entry, value, entry.ldm_ndim))
        sd["model_ema.decay"] = np.array(ema.decay, np.float32)
        sd["model_ema.num_updates"] = np.array(ema.num_updates, np.int32)
    return sd


# --------------------------------------------------------------------------------------------------
# The original's YAML config and the CLIP JSON
# --------------------------------------------------------------------------------------------------


def clip_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The CLIP vision tower as a transformers `CLIPVisionConfig` JSON dict (`from_json_file` reads it)."""
    c = config.clip
    return {
        "attention_dropout": 0.0,
        "hidden_act": c.hidden_act,
        "hidden_size": c.hidden_size,
        "image_size": c.image_size,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "layer_norm_eps": c.layer_norm_eps,
        "model_type": "clip_vision_model",
        "num_attention_heads": c.num_attention_heads,
        "num_channels": c.num_channels,
        "num_hidden_layers": c.num_hidden_layers,
        "patch_size": c.patch_size,
        "projection_dim": config.context_dim,
    }


def ldm_yaml_dict(config: ModelConfig, use_ema: bool = False) -> dict[str, Any]:
    """`{'model': …}` in the layout of the original `configs/v1_aesthetic_sketch_image.yaml` (PbS) or
    `configs/v1.yaml` (PbE, 9 channels: no `sketch_stage_config`)."""
    u, v, s = config.unet, config.vae, config.schedule
    unet_params: dict[str, Any] = {
        "image_size": config.latent_size,
        "in_channels": u.in_channels,
        "out_channels": u.out_channels,
        "model_channels": u.model_channels,
        "attention_resolutions": list(u.attention_resolutions),
        "num_res_blocks": u.num_res_blocks,
        "channel_mult": list(u.channel_mult),
    }
    if u.num_head_channels != -1:
        unet_params["num_head_channels"] = u.num_head_channels
    else:
        unet_params["num_heads"] = u.num_heads
    unet_params.update(
        use_spatial_transformer=True,
        transformer_depth=u.transformer_depth,
        context_dim=u.context_dim,
    )
    if u.use_linear_projection:
        unet_params["use_linear_in_transformer"] = True
    unet_params.update(use_checkpoint=True, legacy=u.legacy, add_conv_in_front_of_unet=False)
    params: dict[str, Any] = {
        "linear_start": s.linear_start,
        "linear_end": s.linear_end,
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": s.timesteps,
    }
    if s.beta_schedule not in ("linear", "scaled_linear"):
        params["beta_schedule"] = s.beta_schedule
    params.update(
        first_stage_key="inpaint",
        cond_stage_key="image",
        image_size=config.latent_size,
        channels=v.embed_dim,
        cond_stage_trainable=True,
        conditioning_key="crossattn",
        monitor="val/loss_simple_ema",
        u_cond_percent=0.2,
        scale_factor=config.scale_factor,
        use_ema=bool(use_ema),
        unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        first_stage_config={
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": v.embed_dim,
                "monitor": "val/rec_loss",
                "ddconfig": {
                    "double_z": v.double_z,
                    "z_channels": v.z_channels,
                    "resolution": v.resolution,
                    "in_channels": v.in_channels,
                    "out_ch": v.out_ch,
                    "ch": v.ch,
                    "ch_mult": list(v.ch_mult),
                    "num_res_blocks": v.num_res_blocks,
                    "attn_resolutions": list(v.attn_resolutions),
                    "dropout": 0.0,
                },
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        cond_stage_config={"target": "ldm.modules.encoders.modules.FrozenCLIPImageEmbedder"},
    )
    if config.uses_sketch:
        params["sketch_stage_config"] = {
            "input_edge_type": config.sketch_edge_type,
            "target_edge_type": "not_use",
            "edge_weight": 100.0,
        }
    return {
        "model": {
            "base_learning_rate": 1.0e-05,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": params,
        }
    }


def ldm_yaml_text(config: ModelConfig, use_ema: bool = False, clip_json_name: str | None = None) -> str:
    """The YAML file text: a header comment naming the sizes the original hard-codes in Python, then
    `ldm_yaml_dict`. `load_ldm_yaml` (our converter) and the original's `OmegaConf.load` read it."""
    import yaml

    c = config.clip
    default_clip = (c.hidden_size, c.num_hidden_layers, c.image_size, c.patch_size) == (1024, 24, 224, 14)
    lines = [
        "# Exported by sketchcomp-jax (launch/export.py) in the format of the original configs/*.yaml.",
        f"# Image {config.resolution}x{config.resolution} <-> latent {config.vae.embed_dim}x{config.latent_size}x"
        f"{config.latent_size} (VAE down-sampling factor {config.vae.downsample_factor}); CLIP input "
        f"{c.image_size}x{c.image_size}.",
        "# Sizes the original hard-codes in Python instead of this file, for this model:",
        "#   cond_stage_model.transformer: CLIPVisionModel("
        + ("openai/clip-vit-large-patch14" if default_clip else "CLIPVisionConfig")
        + (f", config: {clip_json_name}" if clip_json_name else "")
        + ")",
        f"#   cond_stage_model.final_ln:    LayerNorm({c.hidden_size})",
        f"#   cond_stage_model.mapper:      xf.Transformer(1, {c.hidden_size}, {config.mapper.layers}, {config.mapper.heads})",
        f"#   proj_out:                     nn.Linear({c.hidden_size}, {config.context_dim})",
        f"#   learnable_vector:             shape (1, 1, {config.context_dim})",
    ]
    if clip_json_name:
        lines.append(
            f"# Convert back with: launch/convert.py --src CKPT --ldm_config THIS.yaml --clip_config {clip_json_name} "
            f"--resolution {config.resolution}"
        )
    body = yaml.safe_dump(ldm_yaml_dict(config, use_ema), sort_keys=False, default_flow_style=None)
    return "\n".join(lines) + "\n" + body

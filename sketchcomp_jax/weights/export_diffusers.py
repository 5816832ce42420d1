"""Flax params → a diffusers `PaintByExamplePipeline` folder: component configs, state dicts, the writer."""
from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.models.clip_norm import CLIP_MEAN, CLIP_STD
from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.weights.convert import flax_to_torch
from sketchcomp_jax.weights.errors import ExportError
from sketchcomp_jax.weights.keymap import model_entries
from sketchcomp_jax.weights.export_ldm import (
    DTYPES,
    EmaWeights,
    as_export_dtype,
    cast_to,
    clip_config_dict,
    param_leaf,
)
from sketchcomp_jax.weights.safetensors_io import save_safetensors

# Versions written into the configs when the library itself is not installed (the files load with any
# diffusers >= 0.9 / transformers >= 4.25; the fields are informational).
_FALLBACK_DIFFUSERS_VERSION = "0.30.0"
_FALLBACK_TRANSFORMERS_VERSION = "4.40.0"


# --------------------------------------------------------------------------------------------------
# diffusers
# --------------------------------------------------------------------------------------------------


def _version(package: str, fallback: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return fallback


def check_diffusers_compatible(config: ModelConfig) -> None:
    """Raises `ExportError` if diffusers' classes cannot express `config` exactly."""
    problems = []
    want_mapper = (config.clip.num_hidden_layers + 1) // 5
    if config.mapper.layers != want_mapper:
        problems.append(
            f"the mapper has {config.mapper.layers} blocks but diffusers' PaintByExampleImageEncoder builds "
            f"(num_hidden_layers + 1) // 5 = {want_mapper} for a {config.clip.num_hidden_layers}-layer CLIP"
        )
    if config.mapper.heads != 1:
        problems.append(f"the mapper has {config.mapper.heads} heads; diffusers' mapper has 1")
    v = config.vae
    if v.attn_resolutions:
        problems.append(f"the VAE has attention at resolutions {list(v.attn_resolutions)}; diffusers' AutoencoderKL only in its mid-blocks")
    if not v.double_z or v.embed_dim != v.z_channels:
        problems.append(
            f"the VAE has embed_dim {v.embed_dim}, z_channels {v.z_channels}, double_z {v.double_z}; diffusers needs "
            "embed_dim == z_channels and double_z"
        )
    u = config.unet
    if u.num_head_channels != -1 and any((u.model_channels * m) % u.num_head_channels for m in u.channel_mult):
        problems.append(f"U-Net channels are not multiples of num_head_channels {u.num_head_channels}")
    if problems:
        raise ExportError(
            "--format diffusers cannot express this model: " + "; ".join(problems)
            + ". Export with --format ldm or --format safetensors instead"
        )


def diffusers_configs(config: ModelConfig, dtype: str | np.dtype = "float32") -> dict[str, dict[str, Any]]:
    """`config.json`-style dicts: `model_index`, `unet`, `vae`, `image_encoder`, `scheduler`, `feature_extractor`."""
    dt_name = {v: k for k, v in DTYPES.items()}[as_export_dtype(dtype)]
    dver = _version("diffusers", _FALLBACK_DIFFUSERS_VERSION)
    tver = _version("transformers", _FALLBACK_TRANSFORMERS_VERSION)
    u, v, s = config.unet, config.vae, config.schedule
    boc = [u.model_channels * m for m in u.channel_mult]
    attn_levels = [2**i in u.attention_resolutions for i in range(len(boc))]
    if u.num_head_channels != -1:
        # diffusers' `attention_head_dim` is (a legacy naming) the number of heads, per level here.
        heads: int | list[int] = [c // u.num_head_channels for c in boc]
    else:
        heads = u.num_heads
    unet = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": dver,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": boc,
        "center_input_sample": False,
        "cross_attention_dim": u.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": u.in_channels,
        "layers_per_block": u.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "only_cross_attention": False,
        "out_channels": u.out_channels,
        "resnet_time_scale_shift": "default",
        "sample_size": config.latent_size,
        "transformer_layers_per_block": u.transformer_depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        "upcast_attention": False,
        "use_linear_projection": u.use_linear_projection,
    }
    vboc = [v.ch * m for m in v.ch_mult]
    vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": dver,
        "act_fn": "silu",
        "block_out_channels": vboc,
        "down_block_types": ["DownEncoderBlock2D"] * len(vboc),
        "force_upcast": True,
        "in_channels": v.in_channels,
        "latent_channels": v.z_channels,
        "layers_per_block": v.num_res_blocks,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": v.out_ch,
        "sample_size": v.resolution,
        "scaling_factor": config.scale_factor,
        "up_block_types": ["UpDecoderBlock2D"] * len(vboc),
        "use_post_quant_conv": True,
        "use_quant_conv": True,
    }
    image_encoder = {
        "architectures": ["PaintByExampleImageEncoder"],
        **clip_config_dict(config),
        "torch_dtype": dt_name,
        "transformers_version": tver,
    }
    beta_schedule = {"linear": "scaled_linear", "scaled_linear": "scaled_linear", "linear_plain": "linear"}.get(
        s.beta_schedule, s.beta_schedule
    )
    scheduler = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": dver,
        "beta_end": s.linear_end,
        "beta_schedule": beta_schedule,
        "beta_start": s.linear_start,
        "num_train_timesteps": s.timesteps,
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }
    size = config.clip.image_size
    feature_extractor = {
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    model_index = {
        "_class_name": "PaintByExamplePipeline",
        "_diffusers_version": dver,
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    return {
        "model_index": model_index,
        "unet": unet,
        "vae": vae,
        "image_encoder": image_encoder,
        "scheduler": scheduler,
        "feature_extractor": feature_extractor,
    }


def diffusers_state_dicts(
    config: ModelConfig, params: Mapping[str, Any], dtype: str | np.dtype = "float32", ema: EmaWeights | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """Flax params → `{'unet': …, 'vae': …, 'image_encoder': …}` diffusers state dicts (torch layout).

    Pointwise weights take each entry's diffusers form (1×1 conv or Linear); the mapper's fused `c_qkv`
    is split into `to_q` / `to_k` / `to_v` along dim 0 (one head). CLIP keys use the hub layout
    `model.vision_model.*`. With `ema`, the U-Net holds the EMA weights.
    """
    dt = as_export_dtype(dtype)
    out: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {}, "image_encoder": {}}
    source = dict(params)
    if ema is not None:
        source["unet"] = ema.unet
    for entry in model_entries(config):
        if entry.diffusers_key is None:  # pragma: no cover - every entry of this model has a diffusers slot
            continue
        value = flax_to_torch(entry, param_leaf(source, entry.flax_path), entry.diffusers_ndim)
        comp = out[entry.diffusers_component]
        if isinstance(entry.diffusers_key, tuple):
            for key, part in zip(entry.diffusers_key, np.split(value, len(entry.diffusers_key), axis=0)):
                comp[key] = cast_to(part, dt)
        else:
            comp[entry.diffusers_key] = cast_to(value, dt)
    return out



def write_diffusers(config: ModelConfig, params, out: pathlib.Path, dtype: str, ema: EmaWeights | None) -> pathlib.Path:
    """Writes the pipeline folder to a temporary sibling of `out`, then swaps it into place (atomic); returns `out`."""
    configs = diffusers_configs(config, dtype)
    sds = diffusers_state_dicts(config, params, dtype, ema)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        (tmp / "model_index.json").write_text(json.dumps(configs["model_index"], indent=2) + "\n")
        files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                 "image_encoder": "model.safetensors"}
        for comp, weights_name in files.items():
            (tmp / comp).mkdir()
            (tmp / comp / "config.json").write_text(json.dumps(configs[comp], indent=2) + "\n")
            save_safetensors(sds[comp], tmp / comp / weights_name, {"format": "pt"})
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2) + "\n")
        (tmp / "feature_extractor").mkdir()
        (tmp / "feature_extractor" / "preprocessor_config.json").write_text(
            json.dumps(configs["feature_extractor"], indent=2) + "\n"
        )
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"failed writing {out}: {e.strerror or e}; nothing was changed") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out

"""Export a model back to the PyTorch world: an LDM `.ckpt`, a diffusers folder, or a safetensors file.

Three formats (see docs/export.md for how to load each one):

* `ldm` — a Lightning-style `torch.save({'state_dict': …, 'global_step', 'epoch'})` checkpoint with exactly
  the key set, shapes and dtypes of the original `LatentDiffusion` (network weights, the int64 CLIP
  `position_ids` buffer and the 12 DDPM schedule buffers), plus `<stem>.yaml` (the original's config format)
  and `<stem>_clip_config.json` (a transformers `CLIPVisionConfig`, which the YAML cannot express).
  Needs torch (imported lazily).
* `safetensors` — the same state dict in one `.safetensors` file (plus the same YAML / CLIP JSON), written
  by our own writer: no torch needed.
* `diffusers` — a `PaintByExamplePipeline` folder (`unet/`, `vae/`, `image_encoder/`, `scheduler/`,
  `feature_extractor/`, `model_index.json`), each component loadable by its class's `from_pretrained`.
  No torch needed either.

Every tensor name comes from the explicit key maps of `keymap.py`, so an export re-converts
(`launch/convert.py --src`) to identical float32 parameters.

Writes are atomic: everything goes to temporary siblings first and is renamed into place at the end, so a
failure never leaves a half-written export nor destroys an existing one.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from sketchcomp_jax.diffusion.schedule import schedule_for
from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.weights.convert import _get_path, flax_to_torch
from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.keymap import CLIP_PREFIX, UNET_PREFIX, ema_key, model_entries, unet_entries

log = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "FORMATS",
    "EmaWeights",
    "ExportError",
    "TrainingCheckpointsUnavailableError",
    "check_diffusers_compatible",
    "clip_config_dict",
    "diffusers_configs",
    "diffusers_state_dicts",
    "export",
    "check_output",
    "export_model",
    "ldm_state_dict",
    "ldm_yaml_text",
    "load_params_from_workdir",
    "save_safetensors",
]

FORMATS = ("ldm", "diffusers", "safetensors")
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
POSITION_IDS_KEY = f"{CLIP_PREFIX}embeddings.position_ids"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Versions written into the configs when the library itself is not installed (the files load with any
# diffusers >= 0.9 / transformers >= 4.25; the fields are informational).
_FALLBACK_DIFFUSERS_VERSION = "0.30.0"
_FALLBACK_TRANSFORMERS_VERSION = "4.40.0"


class ExportError(CheckpointError):
    """The export cannot be written: bad format / dtype / output path, or the model cannot be expressed."""


class TrainingCheckpointsUnavailableError(ExportError, NotImplementedError):
    """`--workdir` has no (readable) training checkpoints."""


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
# safetensors writer (no torch)
# --------------------------------------------------------------------------------------------------

_ST_NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
}
# The order of the reference implementation's dtype enum: tensors are laid out by descending dtype, then by
# name, which keeps every tensor aligned to its element size and makes our files byte-identical to
# `safetensors.{numpy,torch}.save_file` output (given the same metadata).
_ST_RANK = {
    name: i
    for i, name in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
    )
}


def _st_dtype(name: str, array: np.ndarray) -> str:
    try:
        return _ST_NAMES[array.dtype]
    except KeyError:
        raise ExportError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store") from None


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name → array) as a safetensors file, without torch.

    Format: 8-byte little-endian header length, a compact JSON header (`__metadata__` first, then
    `{name: {dtype, shape, data_offsets}}`) padded with spaces to a multiple of 8 bytes, then the raw
    little-endian C-order tensor bytes. Tensors are streamed to the file one at a time.
    """
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ExportError(f"invalid tensor name {name!r} for safetensors")
        a = np.asarray(value)
        if a.dtype.byteorder not in "=|":  # non-native byte order: store values, not bytes
            a = a.astype(a.dtype.newbyteorder("="))
        arrays[name] = a
    order = sorted(arrays, key=lambda n: (-_ST_RANK[_st_dtype(n, arrays[n])], n))
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ExportError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            a = np.ascontiguousarray(arrays[name])
            if a.dtype.itemsize > 1 and sys.byteorder == "big":
                a = a.view(np.dtype(f"u{a.dtype.itemsize}")).byteswap()
            f.write(memoryview(a.reshape(-1).view(np.uint8)))


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def _dtype(dtype: str | np.dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    dt = np.dtype(dtype)
    if dt not in DTYPES.values():
        raise ExportError(f"unsupported export dtype {dt}; choose one of {', '.join(DTYPES)}")
    return dt


def _cast(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Floating arrays → `dtype` (round to nearest even); integer / bool arrays unchanged. Always a fresh,
    writable, C-contiguous array that owns its memory."""
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.floating) or a.dtype == ml_dtypes.bfloat16:
        return np.array(a.astype(np.float32).astype(dtype), order="C")
    return np.array(a, order="C")


def _leaf(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
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
    dt = _dtype(dtype)
    weights = {e.ldm_key: (e, _leaf(params, e.flax_path)) for e in model_entries(config)}
    sd: dict[str, np.ndarray] = {}

    def put(key: str, value: np.ndarray):
        sd[key] = _cast(value, dt)

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
            value = _leaf({"unet": ema.unet}, entry.flax_path)
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
    dt_name = {v: k for k, v in DTYPES.items()}[_dtype(dtype)]
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
    dt = _dtype(dtype)
    out: dict[str, dict[str, np.ndarray]] = {"unet": {}, "vae": {}, "image_encoder": {}}
    source = dict(params)
    if ema is not None:
        source["unet"] = ema.unet
    for entry in model_entries(config):
        if entry.diffusers_key is None:  # pragma: no cover - every entry of this model has a diffusers slot
            continue
        value = flax_to_torch(entry, _leaf(source, entry.flax_path), entry.diffusers_ndim)
        comp = out[entry.diffusers_component]
        if isinstance(entry.diffusers_key, tuple):
            for key, part in zip(entry.diffusers_key, np.split(value, len(entry.diffusers_key), axis=0)):
                comp[key] = _cast(part, dt)
        else:
            comp[entry.diffusers_key] = _cast(value, dt)
    return out


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _prepare_output(out: pathlib.Path, overwrite: bool, is_dir: bool, companions: tuple[pathlib.Path, ...] = ()) -> None:
    """Refuses outputs that exist (unless `overwrite`), the wrong kind of path, or an unwritable parent."""
    for path in (out, *companions):
        if path.is_dir() and not is_dir:
            raise ExportError(f"{path} is a directory; this format writes a file: give a file path for --out")
        if path.exists() and not path.is_dir() and is_dir:
            raise ExportError(f"{path} is a file; --format diffusers writes a folder: give a directory path for --out")
        exists = path.exists() and (not path.is_dir() or any(path.iterdir()))
        if exists and not overwrite:
            raise ExportError(f"output {path} already exists; choose another --out or pass --overwrite to replace it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the output folder {parent}: {e.strerror or e}; choose a writable --out") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write to {parent} (permission denied); choose a writable --out")


def check_output(out: str | os.PathLike, format: str, overwrite: bool = False) -> pathlib.Path:
    """Validates `--out` for `format` before anything is computed; returns it as an absolute path.

    `ldm` / `safetensors` write a file plus `<stem>.yaml` and `<stem>_clip_config.json` beside it; all
    three are checked. `diffusers` writes a folder (an existing empty folder is fine).
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if "://" in os.fspath(out):  # torch.save / safetensors / diffusers write local files only
        raise ExportError(f"--out {os.fspath(out)} is a URL: export to a local path, then copy it "
                          "(e.g. `gcloud storage cp`); --model/--workdir may be gs:// paths")
    out = pathlib.Path(out).absolute()
    if format == "diffusers":
        _prepare_output(out, overwrite, is_dir=True)
        return out
    if out.suffix in (".yaml", ".yml", ".json"):
        raise ExportError(
            f"--out {out} has a config-file suffix; give the weights file, e.g. "
            f"model.{'ckpt' if format == 'ldm' else 'safetensors'}"
        )
    if format == "ldm":
        _require_torch()
    _prepare_output(out, overwrite, is_dir=False, companions=_companions(out))
    return out


def _tmp_sibling(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_files(writers: list[tuple[pathlib.Path, Callable[[pathlib.Path], None]]]) -> list[pathlib.Path]:
    """Runs each writer on a temporary sibling of its path; renames them all into place only if all succeed."""
    temps = []
    try:
        for path, write in writers:
            tmp = _tmp_sibling(path)
            temps.append(tmp)
            write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise ExportError(f"failed writing {path}: {getattr(e, 'strerror', None) or e}; nothing was changed") from None
    except BaseException:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        raise
    for (path, _), tmp in zip(writers, temps):
        os.replace(tmp, path)
    log.info("wrote %s", ", ".join(str(p) for p, _ in writers))
    return [path for path, _ in writers]


def _write_text(text: str) -> Callable[[pathlib.Path], None]:
    return lambda p: p.write_text(text)


def _write_json(obj: Any) -> Callable[[pathlib.Path], None]:
    return _write_text(json.dumps(obj, indent=2) + "\n")


def _require_torch():
    try:
        import torch
    except ImportError:
        raise ExportError(
            "--format ldm writes a PyTorch .ckpt and needs torch, which is not installed: `pip install torch` "
            "(CPU wheel: pip install torch --index-url https://download.pytorch.org/whl/cpu), or use "
            "--format safetensors, which needs no torch"
        ) from None
    return torch


def _to_torch(torch, a: np.ndarray):
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.uint16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(a, order="C"))


def _companions(out: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + ".yaml"), out.with_name(stem + "_clip_config.json")


def export_model(
    config: ModelConfig,
    params: Mapping[str, Any],
    out: str | os.PathLike,
    format: str,
    *,
    dtype: str = "float32",
    ema: EmaWeights | None = None,
    include_ema: bool = False,
    overwrite: bool = False,
    global_step: int = 0,
    epoch: int = 0,
) -> list[pathlib.Path]:
    """Writes `(config, params)` to `out` in `format` ('ldm' | 'diffusers' | 'safetensors').

    Returns the written paths (the main file / folder first). `include_ema=True` requires `ema`
    (else `ExportError: model has no EMA weights`): `ldm` / `safetensors` then also hold the original's
    `model_ema.*` buffers (and the YAML says `use_ema: True`); `diffusers` gets the EMA U-Net.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    _dtype(dtype)
    if config.conditioning != "example":
        raise ExportError(
            "this model is the text-conditioned Paint-by-T+S baseline: export writes Paint-by-Example / Paint-by-Sketch "
            "layouts only; evaluate or sample it here (launch/evaluate.py, launch/sample.py --prompt)"
        )
    if include_ema and ema is None:
        raise ExportError("model has no EMA weights; drop --include_ema (or export a training run that kept an EMA)")
    use_ema = ema if include_ema else None
    if format == "diffusers":
        check_diffusers_compatible(config)
    out = check_output(out, format, overwrite)
    if format == "diffusers":
        return [_write_diffusers(config, params, out, dtype, use_ema)]

    yaml_path, clip_path = _companions(out)
    torch = _require_torch() if format == "ldm" else None
    sd = ldm_state_dict(config, params, dtype, use_ema)
    if format == "ldm":
        def write_main(path: pathlib.Path):
            state = {k: _to_torch(torch, v) for k, v in sd.items()}
            torch.save({"state_dict": state, "global_step": int(global_step), "epoch": int(epoch)}, path)
    else:
        def write_main(path: pathlib.Path):
            save_safetensors(sd, path, {"format": "pt"})
    return _write_files([
        (out, write_main),
        (yaml_path, _write_text(ldm_yaml_text(config, use_ema is not None, clip_path.name))),
        (clip_path, _write_json(clip_config_dict(config))),
    ])


def _write_diffusers(config: ModelConfig, params, out: pathlib.Path, dtype: str, ema: EmaWeights | None) -> pathlib.Path:
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


# --------------------------------------------------------------------------------------------------
# Sources: a model directory or a training work directory
# --------------------------------------------------------------------------------------------------


def load_params_from_workdir(workdir: str | os.PathLike, step: int | None = None, include_ema: bool = True):
    """`--workdir`: `(ModelConfig, params, EmaWeights | None, global_step)` of a training run.

    Training checkpoints live in `WORKDIR/checkpoints/` (Orbax, one sub-directory per step; the latest unless
    `step` is given). Raises `TrainingCheckpointsUnavailableError` when there are none, naming what exists.
    """
    from sketchcomp_jax.paths import as_path

    workdir = as_path(workdir)  # local or gs://
    if not workdir.is_dir():
        raise ExportError(f"--workdir {workdir} does not exist or is not a directory")
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise TrainingCheckpointsUnavailableError(
            f"no training checkpoints in {workdir} (expected {ckpt_dir}/, written by launch/train.py); "
            "to export converted weights use --model DIR"
        )
    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not steps:
        raise TrainingCheckpointsUnavailableError(f"no training checkpoints in {ckpt_dir} (no step directories)")
    if step is not None and step not in steps:
        raise ExportError(f"--step {step} not found in {ckpt_dir}; available steps: {steps}")
    from sketchcomp_jax.train.checkpointing import load_training_params

    try:
        config, params, ema, global_step = load_training_params(workdir, step if step is not None else steps[-1],
                                                                ema="unet" if include_ema else "none")
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    ema_weights = None
    if ema is not None:
        # LitEma's counter is the number of EMA updates (one per optimizer step); runs saved before the
        # counter existed fall back to the step count.
        num_updates = int(ema.get("num_updates", global_step))
        ema_weights = EmaWeights(unet=ema["unet"], decay=_training_ema_decay(ckpt_dir / str(global_step)),
                                 num_updates=num_updates)
    return config, params, ema_weights, global_step


def _training_ema_decay(step_dir: pathlib.Path, default: float = 0.9999) -> float:
    """The run's configured `ema_decay` (from the checkpoint's saved config), or LitEma's default 0.9999."""
    import orbax.checkpoint as ocp

    try:
        cfg = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "config")
    except Exception:  # noqa: BLE001 - an unreadable config only loses the decay value, which is then logged
        cfg = None
    decay = cfg.get("ema_decay") if isinstance(cfg, dict) else None
    if not decay:
        log.warning("no ema_decay in %s/config: writing model_ema.decay = %g", step_dir, default)
        return default
    return float(decay)


def _load_model_dir(model_dir: str | os.PathLike):
    from sketchcomp_jax.weights.model_dir import load_model

    from sketchcomp_jax.paths import as_path

    path = as_path(model_dir)  # local or gs://
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ExportError(
            f"{path} is not a model directory (no config.json); make one with "
            "`python launch/convert.py --src CHECKPOINT --out DIR`"
        )
    try:
        return load_model(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(f"cannot read the model directory {path}: {e}") from None


def export(
    out: str | os.PathLike,
    format: str,
    *,
    model_dir: str | os.PathLike | None = None,
    workdir: str | os.PathLike | None = None,
    step: int | None = None,
    dtype: str = "float32",
    include_ema: bool = False,
    overwrite: bool = False,
) -> list[pathlib.Path]:
    """`launch/export.py`: reads a model directory (or a training work directory) and calls `export_model`."""
    if (model_dir is None) == (workdir is None):
        raise ExportError("give exactly one of --model DIR or --workdir DIR")
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    _dtype(dtype)
    if step is not None and workdir is None:
        raise ExportError("--step only applies to --workdir")
    check_output(out, format, overwrite)  # fail fast, before reading any weights
    ema, global_step = None, 0
    if model_dir is not None:
        config, params = _load_model_dir(model_dir)
    else:
        config, params, ema, global_step = load_params_from_workdir(workdir, step, include_ema=include_ema)
    return export_model(
        config, params, out, format, dtype=dtype, ema=ema, include_ema=include_ema, overwrite=overwrite,
        global_step=global_step,
    )

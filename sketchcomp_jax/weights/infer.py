"""Architecture inference: a `ModelConfig` from checkpoint tensor shapes, an original YAML and a CLIP JSON.

Shapes tell almost everything (channels, levels, blocks, attention placement, projection kind);
what they cannot tell comes from the original YAML (`--ldm_config`: heads, VAE nominal resolution),
the CLIP config JSON (`--clip_config`: heads, activation), or the SD v1 / ViT-L/14 defaults.
"""
from __future__ import annotations

import logging
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.models.config import ModelConfig, ScheduleConfig
from sketchcomp_jax.models.clip_vision import CLIPVisionConfig
from sketchcomp_jax.models.conditioner import MapperConfig
from sketchcomp_jax.models.unet import UNetConfig
from sketchcomp_jax.models.vae import VAEConfig
from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.keymap import CLIP_PREFIX, MAPPER_PREFIX, UNET_PREFIX, VAE_PREFIX

log = logging.getLogger(__name__)
StateDict = Mapping[str, np.ndarray]


class ArchitectureError(CheckpointError):
    """The checkpoint's tensors do not describe a model this code can build."""


def load_ldm_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads an original LDM config (e.g. `configs/v1_aesthetic_sketch_image.yaml`) → `model.params` dict."""
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--ldm_config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--ldm_config {path} is not valid YAML: {e}") from None
    try:
        params = raw["model"]["params"]
        params["unet_config"]["params"]
    except (KeyError, TypeError):
        raise ValueError(
            f"--ldm_config {path} does not look like an original LDM config (expected model.params.unet_config.params)"
        ) from None
    return params


def ldm_use_ema(ldm_yaml: Mapping[str, Any] | None) -> bool | None:
    """The YAML's `model.params.use_ema` (None when absent or no YAML: LDM's `DDPM` then defaults to True).

    With it, the original samples inside `ema_scope()`, i.e. with the checkpoint's `model_ema.*` U-Net."""
    if not ldm_yaml or "use_ema" not in ldm_yaml:
        return None
    value = ldm_yaml["use_ema"]
    if not isinstance(value, bool):
        raise ValueError(f"--ldm_config: model.params.use_ema must be true or false, not {value!r}")
    return value


def _count(sd: StateDict, pattern: str) -> int:
    """Number of distinct integers `N` for which some key matches `pattern` with `{N}` in it."""
    rx = re.compile(re.escape(pattern).replace(r"\{N\}", r"(\d+)"))
    found = {int(m.group(1)) for k in sd for m in [rx.match(k)] if m}
    return max(found) + 1 if found else 0


def _shape(sd: StateDict, key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ArchitectureError(f"checkpoint has no tensor {key!r}; cannot infer the architecture")
    return tuple(sd[key].shape)


def infer_unet(sd: StateDict, yaml_unet: Mapping[str, Any] | None = None) -> UNetConfig:
    p = UNET_PREFIX
    yaml_unet = dict(yaml_unet or {})
    mc, in_ch = _shape(sd, f"{p}input_blocks.0.0.weight")[:2]
    out_ch = _shape(sd, f"{p}out.2.weight")[0]
    n_input = _count(sd, f"{p}input_blocks.{{N}}.")
    channel_mult: list[int] = []
    attn_levels: list[int] = []
    res_per_level: list[int] = []
    current = 0
    level_has_attn = False
    for i in range(1, n_input):
        if f"{p}input_blocks.{i}.0.op.weight" in sd:
            res_per_level.append(current)
            attn_levels.append(level_has_attn)
            current, level_has_attn = 0, False
            continue
        out = _shape(sd, f"{p}input_blocks.{i}.0.out_layers.3.weight")[0]
        if current == 0:
            channel_mult.append(out // mc)
        current += 1
        level_has_attn = level_has_attn or f"{p}input_blocks.{i}.1.proj_in.weight" in sd
    res_per_level.append(current)
    attn_levels.append(level_has_attn)
    if len(set(res_per_level)) != 1:
        raise ArchitectureError(f"U-Net levels have different numbers of res blocks {res_per_level}; unsupported")
    attention_resolutions = tuple(2**level for level, has in enumerate(attn_levels) if has)
    proj_in = sd.get(f"{p}middle_block.1.proj_in.weight")
    use_linear = proj_in is not None and proj_in.ndim == 2
    to_k = [k for k in sd if k.startswith(p) and k.endswith("attn2.to_k.weight")]
    context_dim = sd[to_k[0]].shape[1] if to_k else yaml_unet.get("context_dim", 768)
    depth = _count(sd, f"{p}middle_block.1.transformer_blocks.{{N}}.") or 1
    if "num_heads" in yaml_unet or "num_head_channels" in yaml_unet:
        num_heads = int(yaml_unet.get("num_heads", -1))
        num_head_channels = int(yaml_unet.get("num_head_channels", -1))
    elif use_linear:  # SD v2 convention: 64-channel heads
        num_heads, num_head_channels = -1, 64
        log.warning("U-Net head count not given: assuming SD v2's 64 channels per head (pass --ldm_config to set it)")
    else:
        num_heads, num_head_channels = 8, -1
    cfg = UNetConfig(
        in_channels=in_ch,
        out_channels=out_ch,
        model_channels=mc,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_per_level[0],
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=int(context_dim),
        transformer_depth=depth,
        use_linear_projection=use_linear,
        legacy=bool(yaml_unet.get("legacy", False)),
    )
    for ch in {mc * m for m in channel_mult}:
        heads, dim_head = cfg.heads_for(ch)
        if heads <= 0 or heads * dim_head != ch:
            raise ArchitectureError(
                f"U-Net heads (num_heads={num_heads}, num_head_channels={num_head_channels}) do not divide "
                f"{ch} channels; pass --ldm_config with the right num_heads / num_head_channels"
            )
    return cfg


def infer_vae(sd: StateDict, yaml_vae: Mapping[str, Any] | None = None) -> VAEConfig:
    p = VAE_PREFIX
    dd = dict((yaml_vae or {}).get("ddconfig", {}))
    ch, in_channels = _shape(sd, f"{p}encoder.conv_in.weight")[:2]
    levels = _count(sd, f"{p}encoder.down.{{N}}.block.0.conv1.weight")
    if levels == 0:
        raise ArchitectureError(f"checkpoint has no VAE encoder blocks ({p}encoder.down.*)")
    ch_mult = tuple(_shape(sd, f"{p}encoder.down.{lvl}.block.0.conv1.weight")[0] // ch for lvl in range(levels))
    num_res_blocks = _count(sd, f"{p}encoder.down.0.block.{{N}}.conv1.weight")
    z_channels = _shape(sd, f"{p}decoder.conv_in.weight")[1]
    enc_out = _shape(sd, f"{p}encoder.conv_out.weight")[0]
    embed_dim = _shape(sd, f"{p}quant_conv.weight")[0] // 2
    resolution = int(dd.get("resolution", 256))
    attn_resolutions = tuple(
        resolution // 2**lvl for lvl in range(levels) if f"{p}encoder.down.{lvl}.attn.0.q.weight" in sd
    )
    return VAEConfig(
        embed_dim=embed_dim,
        z_channels=z_channels,
        double_z=enc_out == 2 * z_channels,
        in_channels=in_channels,
        out_ch=_shape(sd, f"{p}decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=attn_resolutions,
        resolution=resolution,
    )


def infer_clip(sd: StateDict, clip_config: CLIPVisionConfig | None = None) -> CLIPVisionConfig:
    c = CLIP_PREFIX
    hidden = _shape(sd, f"{c}embeddings.class_embedding")[0]
    patch = _shape(sd, f"{c}embeddings.patch_embedding.weight")[2]
    positions = _shape(sd, f"{c}embeddings.position_embedding.weight")[0]
    grid = math.isqrt(positions - 1)
    layers = _count(sd, f"{c}encoder.layers.{{N}}.")
    intermediate = _shape(sd, f"{c}encoder.layers.0.mlp.fc1.weight")[0]
    shapes = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        image_size=grid * patch,
        patch_size=patch,
        num_channels=_shape(sd, f"{c}embeddings.patch_embedding.weight")[1],
    )
    if clip_config is not None:
        given = clip_config.to_dict()
        wrong = {k: (given[k], v) for k, v in shapes.items() if given[k] != v}
        if wrong:
            detail = ", ".join(f"{k}: config {a} vs checkpoint {b}" for k, (a, b) in wrong.items())
            raise ArchitectureError(f"--clip_config does not match the checkpoint's CLIP tensors ({detail})")
        return clip_config
    if hidden % 64:
        raise ArchitectureError(
            f"CLIP hidden size {hidden} is not a ViT size; pass --clip_config with its CLIPVisionConfig JSON"
        )
    return CLIPVisionConfig(num_attention_heads=hidden // 64, **shapes)


def infer_mapper(sd: StateDict) -> MapperConfig:
    width = _shape(sd, f"{MAPPER_PREFIX}0.attn.c_qkv.weight")[1]
    return MapperConfig(width=width, layers=_count(sd, f"{MAPPER_PREFIX}{{N}}."), heads=1)


def infer_model_config(
    sd: StateDict,
    ldm_yaml: Mapping[str, Any] | None = None,
    clip_config: CLIPVisionConfig | None = None,
    resolution: int = 512,
) -> ModelConfig:
    """The `ModelConfig` a flat LDM-layout state dict describes (see module docstring for precedence)."""
    ldm_yaml = dict(ldm_yaml or {})
    yaml_unet = ldm_yaml.get("unet_config", {}).get("params", {})
    yaml_vae = ldm_yaml.get("first_stage_config", {}).get("params", {})
    unet = infer_unet(sd, yaml_unet)
    sketch = ldm_yaml.get("sketch_stage_config", {}) or {}
    return ModelConfig(
        unet=unet,
        vae=infer_vae(sd, yaml_vae),
        clip=infer_clip(sd, clip_config),
        mapper=infer_mapper(sd),
        context_dim=_shape(sd, "proj_out.weight")[0],
        scale_factor=float(ldm_yaml.get("scale_factor", 0.18215)),
        resolution=resolution,
        schedule=ScheduleConfig(
            beta_schedule=str(ldm_yaml.get("beta_schedule", "linear")),
            timesteps=int(ldm_yaml.get("timesteps", 1000)),
            linear_start=float(ldm_yaml.get("linear_start", 0.00085)),
            linear_end=float(ldm_yaml.get("linear_end", 0.012)),
        ),
        sketch_edge_type=str(sketch.get("input_edge_type", "only_mask_region")),
    )

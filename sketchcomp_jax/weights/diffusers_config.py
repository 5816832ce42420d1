"""`ModelConfig` from the `config.json` files of a diffusers Paint-by-Example folder (and back)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.models.clip_vision import CLIPVisionConfig
from sketchcomp_jax.models.conditioner import MapperConfig
from sketchcomp_jax.models.config import ModelConfig
from sketchcomp_jax.models.unet import UNetConfig
from sketchcomp_jax.models.vae import VAEConfig
from sketchcomp_jax.weights.infer import ArchitectureError


def unet_config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """diffusers `UNet2DConditionModel` config → our `UNetConfig` (SD v1/v2 block types only)."""
    boc = list(cfg["block_out_channels"])
    mc = boc[0]
    down = list(cfg.get("down_block_types", []))
    supported = {"CrossAttnDownBlock2D", "DownBlock2D"}
    if not down or set(down) - supported:
        raise ArchitectureError(f"unsupported diffusers down_block_types {down}; only {sorted(supported)}")
    if not cfg.get("flip_sin_to_cos", True) or cfg.get("freq_shift", 0) != 0:
        raise ArchitectureError("diffusers U-Net uses a timestep embedding other than LDM's (flip_sin_to_cos=True, freq_shift=0)")
    layers = cfg.get("transformer_layers_per_block", 1)
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ArchitectureError(f"per-level transformer depths {layers} are not supported")
        layers = layers[0]
    # diffusers' `attention_head_dim` is, for SD checkpoints, the number of heads (a legacy naming);
    # `num_attention_heads`, when set, is unambiguous.
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        per_head = {c // h for c, h in zip(boc, heads)}
        if len(per_head) == 1 and len(set(heads)) > 1:
            num_heads, num_head_channels = -1, per_head.pop()
        elif len(set(heads)) == 1:
            num_heads, num_head_channels = heads[0], -1
        else:
            raise ArchitectureError(f"per-level attention heads {heads} match neither a fixed head count nor a fixed head size")
    else:
        num_heads, num_head_channels = int(heads), -1
    return UNetConfig(
        in_channels=int(cfg.get("in_channels", 4)),
        out_channels=int(cfg.get("out_channels", 4)),
        model_channels=mc,
        channel_mult=tuple(c // mc for c in boc),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attention_resolutions=tuple(2**i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"),
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        context_dim=int(cfg.get("cross_attention_dim", 768)),
        transformer_depth=int(layers),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
    )


def vae_config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    boc = list(cfg["block_out_channels"])
    return VAEConfig(
        embed_dim=int(cfg.get("latent_channels", 4)),
        z_channels=int(cfg.get("latent_channels", 4)),
        double_z=True,
        in_channels=int(cfg.get("in_channels", 3)),
        out_ch=int(cfg.get("out_channels", 3)),
        ch=boc[0],
        ch_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=int(cfg.get("layers_per_block", 2)),
        attn_resolutions=(),
        resolution=int(cfg.get("sample_size", 256)),
    )


def model_config_from_diffusers(components: Mapping[str, Mapping[str, Any]], resolution: int = 512) -> ModelConfig:
    """`components[name] = {'config': dict, 'state_dict': dict}` for `unet`, `vae`, `image_encoder`."""
    for name in ("unet", "vae", "image_encoder"):
        if name not in components:
            raise ArchitectureError(f"diffusers folder lacks the '{name}' component (a Paint-by-Example folder has unet/, vae/, image_encoder/)")
    unet = unet_config_from_diffusers(components["unet"]["config"])
    enc_cfg = components["image_encoder"]["config"]
    enc_sd = components["image_encoder"]["state_dict"]
    if not any(f"model.{mid}embeddings.class_embedding" in enc_sd for mid in ("vision_model.", "")):
        raise ArchitectureError("image_encoder/ is not a PaintByExampleImageEncoder (no model.vision_model.* weights)")
    clip = CLIPVisionConfig.from_dict(enc_cfg)
    mapper_layers = len({k.split(".")[2] for k in enc_sd if k.startswith("mapper.blocks.")})
    context_dim = int(np.shape(enc_sd["proj_out.weight"])[0])
    scale = float(components["vae"]["config"].get("scaling_factor", 0.18215))
    return ModelConfig(
        unet=unet,
        vae=vae_config_from_diffusers(components["vae"]["config"]),
        clip=clip,
        mapper=MapperConfig(width=clip.hidden_size, layers=mapper_layers, heads=1),
        context_dim=context_dim,
        scale_factor=scale,
        resolution=resolution,
    )

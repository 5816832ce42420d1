"""Tiny random PyTorch reference models (diffusers / transformers) written as a diffusers folder.

Every parameter gets N(0, 0.02²) noise on top of its default init (as the golden fixtures do), so
zero-initialised layers are exercised too.
"""
from __future__ import annotations

import json
import pathlib

import torch


def perturb_(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def tiny_unet(in_channels: int = 12, linear: bool = False, context_dim: int = 40, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    kwargs = dict(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1 if not linear else 2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        norm_num_groups=32,
    )
    if linear:  # SD v2 style: Linear proj_in/out, fixed 16-channel heads, two transformer layers.
        kwargs.update(use_linear_projection=True, attention_head_dim=(2, 4), transformer_layers_per_block=2)
    else:
        kwargs.update(attention_head_dim=2)
    unet = UNet2DConditionModel(**kwargs).eval()
    perturb_(unet, seed + 1)
    return unet


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()
    perturb_(vae, seed + 1)
    return vae


def tiny_clip_config(context_dim: int = 40):
    from transformers import CLIPVisionConfig

    # 9 hidden layers → diffusers' PaintByExampleMapper builds (9 + 1) // 5 = 2 mapper blocks.
    return CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=9,
        num_attention_heads=4,
        image_size=24,
        patch_size=6,
        projection_dim=context_dim,
        hidden_act="quick_gelu",
    )


def tiny_image_encoder(context_dim: int = 40, seed: int = 0):
    from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder

    torch.manual_seed(seed)
    enc = PaintByExampleImageEncoder(tiny_clip_config(context_dim), proj_size=context_dim).eval()
    enc.config._attn_implementation = "eager"
    perturb_(enc, seed + 1)
    return enc


def write_diffusers_folder(path: pathlib.Path, unet, vae, image_encoder) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet")
    vae.save_pretrained(path / "vae")
    image_encoder.save_pretrained(path / "image_encoder")
    (path / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "PaintByExamplePipeline",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "image_encoder": ["paint_by_example", "PaintByExampleImageEncoder"],
            }
        )
    )
    return path

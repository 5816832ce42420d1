"""The whole Paint-by-Sketch / Paint-by-Example model: one config naming every hyper-parameter.

A model directory's `config.json` is `ModelConfig.to_dict()`; `ModelConfig.from_dict` reads it back.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from sketchcomp_jax.models.attention import check_backend
from sketchcomp_jax.models.clip_text import CLIPTextConfig
from sketchcomp_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from sketchcomp_jax.models.conditioner import MapperConfig, ReferenceConditioner
from sketchcomp_jax.models.text_conditioner import TextConditioner
from sketchcomp_jax.models.unet import UNet, UNetConfig
from sketchcomp_jax.models.vae import SCALE_FACTOR, AutoencoderKL, VAEConfig

CONFIG_FORMAT = "sketchcomp-jax-model"
CONFIG_VERSION = 1
SKETCH_EDGE_TYPES = ("only_mask_region", "full", "erase_mask_region", "not_use")
CONDITIONINGS = ("example", "text")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """LDM DDPM schedule: "linear" in LDM naming is scaled-linear (linspace of square roots, squared)."""

    beta_schedule: str = "linear"
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild the networks and use them as the original does.

    `resolution` is the image size the model is meant for (512 for the released weights); the latent
    size is `resolution // vae.downsample_factor`. `sketch_edge_type` is the original's
    `sketch_stage_config.input_edge_type` (`only_mask_region`: sketch kept only inside the hole).
    `conditioning`: "example" (Paint-by-Example / -Sketch: reference image → CLIP vision → mapper, context
    (B, 1, D)) or "text" (the Paint-by-T+S baseline: tags → CLIP text tower `text`, context (B, 77, D));
    `clip` and `mapper` are unused for text. `attention`: the U-Net's attention backend
    (`models.attention.BACKENDS`, default "auto": picked per layer for the platform; docs/attention.md).
    """

    unet: UNetConfig = UNetConfig()
    vae: VAEConfig = VAEConfig()
    clip: CLIPVisionConfig = CLIPVisionConfig()
    mapper: MapperConfig = MapperConfig()
    context_dim: int = 768
    scale_factor: float = SCALE_FACTOR
    resolution: int = 512
    schedule: ScheduleConfig = ScheduleConfig()
    sketch_edge_type: str = "only_mask_region"
    conditioning: str = "example"
    text: CLIPTextConfig | None = None
    attention: str = "auto"

    def __post_init__(self):
        check_backend(self.attention)
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
        if self.conditioning == "text":
            if self.text is None:
                raise ValueError("conditioning='text' needs a CLIP text config (`text`)")
            if self.text.hidden_size != self.context_dim:
                raise ValueError(f"CLIP text hidden size {self.text.hidden_size} != context_dim {self.context_dim}")
        elif self.mapper.width != self.clip.hidden_size:
            raise ValueError(
                f"mapper width {self.mapper.width} must equal the CLIP hidden size {self.clip.hidden_size}"
            )
        if self.unet.context_dim != self.context_dim:
            raise ValueError(f"U-Net context_dim {self.unet.context_dim} != conditioner context_dim {self.context_dim}")
        if self.sketch_edge_type not in SKETCH_EDGE_TYPES:
            raise ValueError(f"sketch_edge_type must be one of {SKETCH_EDGE_TYPES}, got {self.sketch_edge_type!r}")
        if self.resolution % self.vae.downsample_factor:
            raise ValueError(f"resolution {self.resolution} is not a multiple of the VAE factor {self.vae.downsample_factor}")

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae.downsample_factor

    @property
    def conditioning_input(self) -> str:
        """The batch key the conditioner reads: `reference` (CLIP-normalised pixels) or `tokens` (int32 ids)."""
        return "tokens" if self.conditioning == "text" else "reference"

    def dummy_conditioning_input(self, batch: int = 1) -> jax.Array:
        """Zeros of the conditioner's input shape and dtype (for init / shape inference)."""
        if self.conditioning == "text":
            return jnp.zeros((batch, self.text.max_position_embeddings), jnp.int32)
        return jnp.zeros((batch, self.clip.image_size, self.clip.image_size, self.clip.num_channels), jnp.float32)

    @property
    def uses_sketch(self) -> bool:
        """12-channel Paint-by-Sketch U-Net (True) or 9-channel Paint-by-Example / 4-channel SD (False)."""
        return self.unet.in_channels == 12

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, **out}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        if raw.get("format") != CONFIG_FORMAT:
            raise ValueError(
                f"not a sketchcomp-jax model config (format={raw.get('format')!r}); "
                "make a model directory with launch/convert.py"
            )
        if raw.get("version", 0) > CONFIG_VERSION:
            raise ValueError(f"model config version {raw['version']} is newer than this code ({CONFIG_VERSION}); upgrade")
        return cls(
            unet=UNetConfig(**raw["unet"]),
            vae=VAEConfig(**raw["vae"]),
            clip=CLIPVisionConfig(**raw["clip"]),
            mapper=MapperConfig(**raw["mapper"]),
            context_dim=raw["context_dim"],
            scale_factor=raw["scale_factor"],
            resolution=raw["resolution"],
            schedule=ScheduleConfig(**raw["schedule"]),
            sketch_edge_type=raw.get("sketch_edge_type", "only_mask_region"),
            conditioning=raw.get("conditioning", "example"),
            text=CLIPTextConfig(**raw["text"]) if raw.get("text") else None,
            attention=raw.get("attention", "auto"),
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Networks:
    """The Flax modules of a model, built from a `ModelConfig` (stateless; params live elsewhere)."""

    unet: UNet
    vae: AutoencoderKL
    conditioner: ReferenceConditioner | TextConditioner


def build_networks(config: ModelConfig, dtype: Any = jnp.float32, remat: bool = False, attention: str | None = None,
                   platform: str | None = None) -> Networks:
    """Flax modules for `config` with compute `dtype` (params stay float32) and optional remat.

    `attention` overrides `config.attention` (None keeps it) for the U-Net; `platform` is the platform
    the networks are compiled for (None: the mesh in context, else `jax.default_backend()`; pass "tpu"
    to lower for a TPU from a CPU host without a TPU mesh in context)."""
    attention = check_backend(config.attention if attention is None else attention)
    return Networks(
        unet=UNet(config.unet, dtype=dtype, remat=remat, attention=attention, platform=platform),
        vae=AutoencoderKL(config.vae, dtype=dtype),
        conditioner=(
            TextConditioner(config.text, dtype=dtype, remat=remat) if config.conditioning == "text"
            else ReferenceConditioner(config.clip, config.mapper, config.context_dim, dtype=dtype, remat=remat)
        ),
    )


__all__ = [
    "CLIPTextConfig",
    "CLIPVisionConfig",
    "CLIPVisionTower",
    "MapperConfig",
    "ModelConfig",
    "Networks",
    "ScheduleConfig",
    "UNetConfig",
    "VAEConfig",
    "build_networks",
]

"""CLIP ViT vision tower (transformers `CLIPVisionModel`) in Flax Linen.

Input: CLIP-normalised pixels (B, H, W, 3) NHWC at `image_size`. Output: `(last_hidden_state (B, 1+P, D),
pooler_output (B, D))` where `pooler_output = post_layernorm(last_hidden_state[:, 0])` (the CLS token),
which is what Paint-by-Example feeds its mapper. `CLIPImageEmbedder` adds the bias-free `visual_projection`
of `CLIPModel.get_image_features` (used by the CLIP metrics).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sketchcomp_jax.models.attention import attention
from sketchcomp_jax.models.clip_norm import CLIP_MEAN, CLIP_STD  # noqa: F401  (part of this module's API)
from sketchcomp_jax.models.layers import ACTIVATIONS, LayerNorm, dense

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of transformers' `CLIPVisionConfig` that define the computation (default: ViT-L/14)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPVisionConfig: unsupported hidden_act {self.hidden_act!r}; one of {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("CLIPVisionConfig: hidden_size must be divisible by num_attention_heads")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "CLIPVisionConfig":
        """From a transformers config dict (a `CLIPVisionConfig` JSON, or a full `CLIPConfig` with `vision_config`)."""
        if "vision_config" in raw and isinstance(raw["vision_config"], dict):
            raw = raw["vision_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CLIPVisionConfig":
        return cls.from_dict(read_config_json(path, "CLIP config"))


def read_config_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A transformers-style `config.json` as a dict; `what` names the file in the errors (a missing file, bad
    JSON, or JSON that is not an object)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(raw).__name__}")
    return raw


class CLIPEncoderLayer(nn.Module):
    """transformers `CLIPEncoderLayer`: pre-LN self-attention and pre-LN MLP, both residual. `config` is a
    vision or text CLIP config (same fields); `causal` for the text tower. `attention`: the backend
    (`models.attention.BACKENDS`); "xla" because CLIP's 77/257 tokens are short enough everywhere."""

    config: Any
    dtype: Dtype = jnp.float32
    causal: bool = False
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm1")(x)
        q = dense(cfg.hidden_size, "q_proj", self.dtype)(h)
        k = dense(cfg.hidden_size, "k_proj", self.dtype)(h)
        v = dense(cfg.hidden_size, "v_proj", self.dtype)(h)
        h = attention(q, k, v, cfg.num_attention_heads, causal=self.causal, backend=self.attention)
        x = x + dense(cfg.hidden_size, "out_proj", self.dtype)(h)
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm2")(x)
        h = ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "fc1", self.dtype)(h))
        return x + dense(cfg.hidden_size, "fc2", self.dtype)(h)


class CLIPVisionTower(nn.Module):
    """`CLIPVisionModel`: patch conv (no bias) + CLS + positions → pre-LN → encoder → post-LN(CLS)."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, height, width, _ = pixel_values.shape
        if height != cfg.image_size or width != cfg.image_size:
            raise ValueError(
                f"CLIP vision tower expects {cfg.image_size}x{cfg.image_size} pixels, got {height}x{width}"
            )
        patches = nn.Conv(
            cfg.hidden_size,
            (cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        class_embedding = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,), jnp.float32)
        position_embedding = self.param(
            "position_embedding", nn.initializers.normal(0.02), (cfg.num_positions, cfg.hidden_size), jnp.float32
        )
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
        h = jnp.concatenate([cls, patches], axis=1) + position_embedding.astype(self.dtype)[None]
        h = LayerNorm(cfg.layer_norm_eps, name="pre_layrnorm")(h)
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(cfg.num_hidden_layers):
            h = layer_cls(cfg, self.dtype, name=f"layers_{i}")(h)
        pooled = LayerNorm(cfg.layer_norm_eps, name="post_layernorm")(h[:, 0])
        return h.astype(jnp.float32), pooled.astype(jnp.float32)


class CLIPImageEmbedder(nn.Module):
    """CLIP vision tower + optional bias-free `visual_projection`. (B, S, S, 3) normalised → (B, D)."""

    config: CLIPVisionConfig
    projection_dim: int | None = None

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        _, pooled = CLIPVisionTower(self.config, name="clip")(pixels)
        if self.projection_dim:
            pooled = nn.Dense(self.projection_dim, use_bias=False, name="visual_projection")(pooled)
        return pooled

"""Paint-by-Example reference conditioner: CLIP pooler → mapper → final LN → proj_out → (B, 1, context_dim).

The original splits this between `FrozenCLIPImageEmbedder` (CLIP + mapper + final_ln) and
`LatentDiffusion` (`proj_out`, `learnable_vector`); here it is one module with four parameter
groups (`clip`, `mapper`, `final_ln`, `proj_out`) plus the `uncond_vector` (1, 1, context_dim),
which replaces the whole context for classifier-free guidance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sketchcomp_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from sketchcomp_jax.models.layers import LayerNorm, dense, gelu_exact

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MapperConfig:
    """`ldm.modules.encoders.xf.Transformer(n_ctx, width, layers, heads)`; `width` = CLIP hidden size."""

    width: int = 1024
    layers: int = 5
    heads: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class MapperBlock(nn.Module):
    """xf `ResidualAttentionBlock`: x += c_proj(attn(c_qkv(ln_1 x))); x += c_proj(gelu(c_fc(ln_2 x)))."""

    heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, tokens, width = x.shape
        head_dim = width // self.heads
        qkv = dense(3 * width, "c_qkv", self.dtype)(LayerNorm(name="ln_1")(x))
        # The original views the fused projection as (B, T, heads, 3·head_dim) and splits q|k|v there,
        # scaling q and k each by head_dim**-0.25.
        qkv = qkv.reshape(batch, tokens, self.heads, 3 * head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        scale = head_dim**-0.25
        logits = jnp.einsum("bthc,bshc->bhts", (q * scale), (k * scale)).astype(jnp.float32)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attn = jnp.einsum("bhts,bshc->bthc", weights, v).reshape(batch, tokens, width)
        x = x + dense(width, "attn_c_proj", self.dtype)(attn)
        h = gelu_exact(dense(4 * width, "c_fc", self.dtype)(LayerNorm(name="ln_2")(x)))
        return x + dense(width, "mlp_c_proj", self.dtype)(h)


class ReferenceConditioner(nn.Module):
    """Reference image → cross-attention context.

    `__call__(pixel_values (B, S, S, 3) CLIP-normalised NHWC) → context (B, 1, context_dim)`.
    `unconditional(batch)` → the learnable unconditional context broadcast to (batch, 1, context_dim).
    """

    clip_config: CLIPVisionConfig
    mapper_config: MapperConfig
    context_dim: int = 768
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        self.clip = CLIPVisionTower(self.clip_config, self.dtype, self.remat, name="clip")
        self.mapper = [
            MapperBlock(self.mapper_config.heads, self.dtype, name=f"mapper_{i}") for i in range(self.mapper_config.layers)
        ]
        self.final_ln = LayerNorm(name="final_ln")
        self.proj_out = dense(self.context_dim, "proj_out", self.dtype)
        self.uncond_vector = self.param(
            "uncond_vector", nn.initializers.normal(1.0), (1, 1, self.context_dim), jnp.float32
        )

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        _, pooled = self.clip(pixel_values)
        return self.map_pooled(pooled)

    def map_pooled(self, pooled: jax.Array) -> jax.Array:
        """CLIP pooler output (B, width) → context (B, 1, context_dim)."""
        h = pooled[:, None, :].astype(self.dtype)
        for block in self.mapper:
            h = block(h)
        return self.proj_out(self.final_ln(h)).astype(jnp.float32)

    def unconditional(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.uncond_vector, (batch, 1, self.context_dim))

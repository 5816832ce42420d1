"""CLIP text tower (transformers `CLIPTextModel`) in Flax Linen: the `FrozenCLIPEmbedder` of Paint-by-T+S.

Input: int token ids (B, L), L <= `max_position_embeddings` (77 for CLIP), as the CLIP tokenizer makes
them (`<|startoftext|> ... <|endoftext|>` then padding; see `models.clip_tokenizer`). Output:
`(last_hidden_state (B, L, D), pooled (B, D))`, both float32:

* `last_hidden_state = final_layer_norm(encoder(token_emb + pos_emb))`, with *causal* self-attention and no
  padding mask (the LDM `FrozenCLIPEmbedder` passes only `input_ids`); this is the cross-attention
  context of the text-conditioned U-Net (77x768 for ViT-L/14, no projection);
* `pooled` is the hidden state at the end-of-text token, picked as transformers does: if
  `eos_token_id == 2` (the value in configs written before transformers PR #24773, e.g.
  `openai/clip-vit-large-patch14` and SD v1's `text_encoder`) the position of the largest id in each row
  (the EOS id is the largest id of the original vocabulary); otherwise the first position holding
  `eos_token_id` (position 0 if a row has none).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sketchcomp_jax.models.clip_vision import CLIPEncoderLayer, read_config_json
from sketchcomp_jax.models.layers import ACTIVATIONS, LayerNorm

Dtype = Any

# transformers reproduces the pre-#24773 pooling (argmax of the ids) when a config says this.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of transformers' `CLIPTextConfig` that define the computation (default: ViT-L/14's text tower).

    `eos_token_id` only chooses how `pooled` finds the end-of-text token (see the module docstring); the
    `last_hidden_state` context does not depend on it.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIPTextConfig: unsupported hidden_act {self.hidden_act!r}; one of {sorted(ACTIVATIONS)}")
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIPTextConfig: hidden_size {self.hidden_size} must be divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CLIPTextConfig: {name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "CLIPTextConfig":
        """From a transformers config dict: a `CLIPTextConfig` JSON, or a full `CLIPConfig` with `text_config`.

        Unknown fields (projection_dim, dropout, initializer, ...) are ignored; missing ones take the
        defaults above. A list `eos_token_id` (allowed by transformers 5 configs) is refused: transformers'
        pooling compares the ids with one value.
        """
        if "text_config" in raw and isinstance(raw["text_config"], dict):
            raw = raw["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in names and v is not None}
        eos = kwargs.get("eos_token_id")
        if eos is not None and not isinstance(eos, int):
            raise ValueError(f"CLIPTextConfig: eos_token_id must be one integer, got {eos!r}")
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "CLIPTextConfig":
        return cls.from_dict(read_config_json(path, "CLIP text config"))


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """(B, L) ids -> (B,) index of the end-of-text token, by transformers' rule for `eos_token_id`."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)  # first occurrence of the largest id
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTower(nn.Module):
    """`CLIPTextModel`: token + position embeddings -> causal encoder -> final_layer_norm.

    Parameters (float32): `token_embedding` (vocab, D), `position_embedding` (positions, D),
    `layers_{i}` ({q,k,v,out}_proj, layer_norm1/2, fc1, fc2) and `final_layer_norm`.
    """

    config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"CLIP text tower expects token ids of shape (batch, length), got {input_ids.shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIP text tower expects integer token ids, got dtype {input_ids.dtype}")
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP text tower: {length} tokens exceed max_position_embeddings={cfg.max_position_embeddings}; "
                "truncate with the tokenizer (it pads/truncates to 77)"
            )
        token_embedding = self.param(
            "token_embedding", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.hidden_size), jnp.float32
        )
        position_embedding = self.param(
            "position_embedding", nn.initializers.normal(0.01), (cfg.max_position_embeddings, cfg.hidden_size),
            jnp.float32,
        )
        # jnp.take clamps out-of-range indices under jit instead of failing; the tokenizer only emits
        # vocabulary ids, so that case means a mismatched tokenizer/model pair, which the caller checks.
        h = jnp.take(token_embedding, input_ids, axis=0) + position_embedding[:length][None]
        h = h.astype(self.dtype)
        layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        for i in range(cfg.num_hidden_layers):
            h = layer_cls(cfg, self.dtype, causal=True, name=f"layers_{i}")(h)
        h = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(h).astype(jnp.float32)
        pooled = jnp.take_along_axis(h, eos_positions(input_ids, cfg.eos_token_id)[:, None, None], axis=1)[:, 0]
        return h, pooled

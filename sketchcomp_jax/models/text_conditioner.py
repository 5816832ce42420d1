"""Text conditioner of the Paint-by-T+S baseline (SPEC §3.9): the original's `FrozenCLIPEmbedder`.

`__call__(input_ids (B, L) int32) → context (B, L, D)`: the CLIP text tower's `last_hidden_state` (no
projection), L = 77 for CLIP. The unconditional context is the encoding of the empty prompt ""
(`get_learned_conditioning([""])`); since the text tower is frozen that is a constant, stored as the
parameter `uncond_vector` (1, L, D) so that training and sampling treat both conditioners alike. Set
it with `empty_prompt_context` after loading or initialising the text tower.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.models.clip_text import CLIPTextConfig, CLIPTextTower

Dtype = Any


class TextConditioner(nn.Module):
    """Parameter groups: `text` (the frozen CLIP text tower) and `uncond_vector` (1, L, D)."""

    text_config: CLIPTextConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.text_config
        self.text = CLIPTextTower(cfg, self.dtype, self.remat, name="text")
        self.uncond_vector = self.param(
            "uncond_vector", nn.initializers.zeros, (1, cfg.max_position_embeddings, cfg.hidden_size), jnp.float32
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        hidden, _ = self.text(input_ids)
        return hidden.astype(jnp.float32)

    def unconditional(self, batch: int) -> jax.Array:
        return jnp.broadcast_to(self.uncond_vector, (batch,) + self.uncond_vector.shape[1:])


def empty_prompt_context(config: CLIPTextConfig, text_params: Any, empty_prompt_ids: np.ndarray) -> np.ndarray:
    """The (1, L, D) context of the empty prompt (`empty_prompt_ids` = tokenizer("") of shape (1, L))."""
    tower = CLIPTextTower(config)
    hidden, _ = jax.jit(lambda p, ids: tower.apply({"params": p}, ids))(text_params, jnp.asarray(empty_prompt_ids))
    return np.asarray(hidden, np.float32)

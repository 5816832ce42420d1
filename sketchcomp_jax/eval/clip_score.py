"""CLIP image embeddings for the CLIP-I score and CLIP-FD, with our Flax CLIP vision tower.

Two encoders are supported:
  * a transformers CLIP folder the user gives (`CLIPModel` or `CLIPVisionModelWithProjection`, e.g. ViT-B/32
    as Paint-by-Example's CLIP score uses): embeddings are `visual_projection(pooler_output)`, i.e.
    `CLIPModel.get_image_features`;
  * without one, the evaluated model's own CLIP tower: embeddings are its `pooler_output` (what the
    conditioner reads), a fallback that needs no extra weights; results say which encoder was used.

Images go in as (H, W, 3) uint8 or float [0, 1]; they are resized to the encoder's size with PIL bicubic
(aspect not kept, as the original's reference preprocessing) and CLIP-normalised.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sketchcomp_jax.models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPImageEmbedder, CLIPVisionConfig


@dataclasses.dataclass
class ClipEncoder:
    """A loaded embedder: `encoder.embed(images)` → (N, D) float64 numpy."""

    config: CLIPVisionConfig
    params: dict[str, Any]
    projection_dim: int | None
    name: str
    batch_size: int = 16

    def __post_init__(self):
        module = CLIPImageEmbedder(self.config, self.projection_dim)
        self._apply = jax.jit(lambda p, x: module.apply({"params": p}, x))

    def preprocess(self, images: Sequence[np.ndarray]) -> np.ndarray:
        s = self.config.image_size
        out = []
        for img in images:
            arr = np.asarray(img)
            if arr.dtype != np.uint8:
                arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
            resized = np.asarray(Image.fromarray(arr).convert("RGB").resize((s, s), Image.BICUBIC), np.float32) / 255.0
            out.append((resized - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32))
        return np.stack(out) if out else np.zeros((0, s, s, 3), np.float32)

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        pixels = self.preprocess(images)
        feats = []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # pad to one compiled shape
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n,) + chunk.shape[1:], chunk.dtype)])
            feats.append(np.asarray(self._apply(self.params, jnp.asarray(chunk)), np.float64)[:n])
        width = self.projection_dim or self.config.hidden_size
        return np.concatenate(feats) if feats else np.zeros((0, width))


def load_clip_encoder(path: str | os.PathLike, batch_size: int = 16) -> ClipEncoder:
    """From a transformers CLIP folder (`config.json` + weights). Raises a clear error naming what is wrong."""
    from sketchcomp_jax.weights.clip_vision_weights import clip_image_encoder_params

    config, params, projection_dim = clip_image_encoder_params(path)
    return ClipEncoder(config, params, projection_dim, name=f"{os.fspath(path)} (image_embeds)", batch_size=batch_size)


def model_clip_encoder(model_config, params: dict[str, Any], batch_size: int = 16) -> ClipEncoder:
    """The evaluated model's own CLIP vision tower (pooler_output)."""
    return ClipEncoder(model_config.clip, {"clip": params["conditioner"]["clip"]}, None,
                       name="the model's CLIP vision tower (pooler_output)", batch_size=batch_size)

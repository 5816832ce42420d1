"""A stand-alone transformers CLIP image encoder (for metrics) → Flax params of `CLIPImageEmbedder`.

Accepts a `CLIPModel` folder (keys `vision_model.*`, `visual_projection.weight`, plus a text tower that is
ignored) or a `CLIPVisionModelWithProjection` / `CLIPVisionModel` folder. torch-free.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from sketchcomp_jax.models.clip_vision import CLIPImageEmbedder, CLIPVisionConfig
import jax
import jax.numpy as jnp

from sketchcomp_jax.weights.convert import CheckpointMismatchError, _get_path, _listing, _set_path, torch_to_flax
from sketchcomp_jax.weights.keymap import clip_vision_entries
from sketchcomp_jax.weights.folders import read_transformers_folder

PROJECTION_KEY = "visual_projection.weight"


def _expected_shapes(config: CLIPVisionConfig) -> dict[str, Any]:
    pixels = jnp.zeros((1, config.image_size, config.image_size, 3))
    return jax.eval_shape(lambda: CLIPImageEmbedder(config).init(jax.random.PRNGKey(0), pixels))["params"]


def clip_image_encoder_params(path: str | os.PathLike) -> tuple[CLIPVisionConfig, dict[str, Any], int | None]:
    """`path`: a transformers CLIP folder. Returns (vision config, params `{'clip': …, 'visual_projection': {'kernel'}}`, projection dim or None)."""
    raw_config, sd = read_transformers_folder(path)
    config = CLIPVisionConfig.from_dict(raw_config)
    sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    expected = _expected_shapes(config)
    params: dict[str, Any] = {}
    missing, wrong = [], []
    for entry in clip_vision_entries(config):
        if entry.ldm_key not in sd:
            missing.append(entry.ldm_key)
            continue
        value = torch_to_flax(entry, sd[entry.ldm_key])
        want = _get_path(expected, entry.flax_path).shape
        if value.shape != tuple(want):
            wrong.append(f"{entry.ldm_key} {tuple(np.shape(sd[entry.ldm_key]))}")
            continue
        _set_path(params, entry.flax_path, value)
    if missing or wrong:
        parts = [_listing("missing keys", missing)] if missing else []
        parts += [_listing("keys with the wrong shape", wrong)] if wrong else []
        raise CheckpointMismatchError(
            f"{path}: not a CLIP vision model matching its config.json: " + "; ".join(parts)
            + ". Give a transformers CLIPModel or CLIPVisionModelWithProjection folder"
        )
    projection_dim = None
    if PROJECTION_KEY in sd:
        w = np.asarray(sd[PROJECTION_KEY], np.float32)
        if w.shape[1] != config.hidden_size:
            raise CheckpointMismatchError(
                f"{path}: {PROJECTION_KEY} has shape {w.shape}, expected (projection_dim, {config.hidden_size})"
            )
        params["visual_projection"] = {"kernel": np.ascontiguousarray(w.T)}
        projection_dim = int(w.shape[0])
    return config, params, projection_dim


def save_clip_vision_folder(config: CLIPVisionConfig, clip_params: dict[str, Any], out_dir: str | os.PathLike) -> str:
    """Writes a model's CLIP vision tower as a transformers `CLIPVisionModel` folder (config.json +
    model.safetensors), torch-free, e.g. to use one fixed encoder for CLIP metrics across several models."""
    import json
    import pathlib

    from sketchcomp_jax.weights.convert import _get_path, flax_to_torch
    from sketchcomp_jax.weights.safetensors_io import save_safetensors

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {e.ldm_key: flax_to_torch(e, np.asarray(_get_path({"clip": clip_params}, e.flax_path), np.float32))
               for e in clip_vision_entries(config)}
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"],
                                                 **config.to_dict()}, indent=2))
    return str(out)

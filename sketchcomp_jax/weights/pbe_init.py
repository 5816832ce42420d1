"""Stable Diffusion v1 → Paint-by-Example initialisation, as the original does it (SPEC §1.5).

The original (Fantasy-Studio/Paint-by-Example `scripts/modify_checkpoints.py` + `main.py`):
  1. zero-extends SD's `input_blocks.0.0.weight` (320, 4, 3, 3) to 9 input channels (PbS: 12);
  2. builds `LatentDiffusion` from `configs/v1.yaml` (`use_ema: False`), whose `FrozenCLIPImageEmbedder` loads
     `CLIPVisionModel.from_pretrained("openai/clip-vit-large-patch14")` and creates the mapper
     (`xf.Transformer(1, 1024, 5, 1)`) and `final_ln` (`LayerNorm(1024)`), while `LatentDiffusion` creates
     `proj_out = nn.Linear(1024, 768)` and `learnable_vector = nn.Parameter(torch.randn(1, 1, 768))`;
  3. `load_state_dict(sd_ckpt['state_dict'], strict=False)`: the U-Net and VAE come from SD; SD's text
     encoder (`cond_stage_model.transformer.text_model.*`) and its EMA buffers (`model_ema.*`, no EMA module
     with `use_ema: False`) match nothing and are dropped; everything else keeps its fresh init.

So the fresh tensors have PyTorch's default initialisation (xf.py at that commit calls no init function):
  * every `nn.Linear(fan_in → fan_out)`: weight and bias ~ U(−1/√fan_in, 1/√fan_in)
    (`kaiming_uniform_(a=√5)` for the weight, the same bound for the bias);
  * every `LayerNorm`: weight 1, bias 0;
  * `learnable_vector` ~ N(0, 1).
We draw them from numpy's PCG64 seeded with `seed`: the distributions are the original's, the numbers
cannot be (they come from torch's global RNG after `seed_everything` and every module built before them).
"""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.models.clip_vision import CLIPVisionConfig
from sketchcomp_jax.weights.convert import CheckpointMismatchError, normalize_clip_prefix
from sketchcomp_jax.weights.keymap import CLIP_PREFIX, MAPPER_PREFIX, UNET_PREFIX
from sketchcomp_jax.weights.folders import read_transformers_folder
from sketchcomp_jax.weights.readers import read_state_dict

log = logging.getLogger(__name__)

MAPPER_LAYERS = 5  # xf.Transformer(n_ctx=1, width=1024, layers=5, heads=1)
CLIP_ROOT = "cond_stage_model.transformer."


def read_clip_vision(path: str | os.PathLike) -> tuple[CLIPVisionConfig | None, dict[str, np.ndarray]]:
    """A transformers `CLIPVisionModel` / `CLIPModel` folder (config.json + weights) or a weights file →
    (its vision config, or None for a bare file; the vision tower's tensors under the LDM names
    `cond_stage_model.transformer.vision_model.*`). A `CLIPModel`'s text tower and projections are dropped,
    as `CLIPVisionModel.from_pretrained` does."""
    p = pathlib.Path(path)
    if p.is_dir():
        raw_config, sd = read_transformers_folder(p)
        config = CLIPVisionConfig.from_dict(raw_config)
    else:
        config, sd = None, read_state_dict(p)
    if any(k.startswith("vision_model.") for k in sd):
        vision = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    elif "embeddings.class_embedding" in sd:  # transformers ≥ 5 saves CLIPVisionModel without `vision_model.`
        vision = {k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm."))}
    else:
        raise CheckpointMismatchError(
            f"--clip_from {p}: no CLIP vision tower in it (no vision_model.* or embeddings.* tensors); give a "
            "transformers CLIPVisionModel or CLIPModel folder, e.g. a download of openai/clip-vit-large-patch14"
        )
    vision = {CLIP_ROOT + k: v for k, v in vision.items() if not k.endswith("position_ids")}
    return config, normalize_clip_prefix(vision, CLIP_ROOT)


def _linear(rng: np.random.Generator, fan_out: int, fan_in: int) -> tuple[np.ndarray, np.ndarray]:
    """torch.nn.Linear's default init: weight (fan_out, fan_in) and bias, both U(−1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / np.sqrt(fan_in)
    w = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
    b = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
    return w, b


def fresh_conditioner_tensors(width: int, context_dim: int, seed: int = 0,
                              layers: int = MAPPER_LAYERS) -> dict[str, np.ndarray]:
    """The tensors Paint-by-Example creates fresh, in the LDM layout: the mapper (`layers` xf residual
    blocks of `width`, one head), `final_ln`, `proj_out` (width → context_dim) and `learnable_vector`
    (1, 1, context_dim), initialised as PyTorch's defaults (module docstring)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}

    def linear(name: str, fan_out: int, fan_in: int):
        out[f"{name}.weight"], out[f"{name}.bias"] = _linear(rng, fan_out, fan_in)

    def layer_norm(name: str):
        out[f"{name}.weight"] = np.ones((width,), np.float32)
        out[f"{name}.bias"] = np.zeros((width,), np.float32)

    for i in range(layers):
        p = f"{MAPPER_PREFIX}{i}"
        linear(f"{p}.attn.c_qkv", 3 * width, width)
        linear(f"{p}.attn.c_proj", width, width)
        layer_norm(f"{p}.ln_1")
        linear(f"{p}.mlp.c_fc", 4 * width, width)
        linear(f"{p}.mlp.c_proj", width, 4 * width)
        layer_norm(f"{p}.ln_2")
    layer_norm("cond_stage_model.final_ln")
    linear("proj_out", context_dim, width)
    out["learnable_vector"] = rng.standard_normal((1, 1, context_dim)).astype(np.float32)
    return out


def _context_dim(sd: Mapping[str, np.ndarray]) -> int:
    to_k = sorted(k for k in sd if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight"))
    if not to_k:
        raise CheckpointMismatchError("the Stable Diffusion checkpoint's U-Net has no cross-attention (attn2.to_k)")
    return int(np.shape(sd[to_k[0]])[1])


def sd_to_pbe_state_dict(sd: Mapping[str, np.ndarray], clip_sd: Mapping[str, np.ndarray], seed: int = 0,
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """SD v1 LDM state dict (U-Net already chosen: no `model_ema.*`) + CLIP vision tensors (LDM names) →
    a full Paint-by-Example LDM state dict (the U-Net still has SD's input channels: the caller's channel
    surgery extends it), and a record of what was dropped and created."""
    if any(k.startswith((CLIP_PREFIX, MAPPER_PREFIX)) for k in sd) or "learnable_vector" in sd:
        raise CheckpointMismatchError(
            "--clip_from: the checkpoint already has a CLIP vision tower / mapper (a Paint-by-Example or "
            "Paint-by-Sketch checkpoint); convert it without --clip_from"
        )
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        raise CheckpointMismatchError("--clip_from: the checkpoint has no U-Net (model.diffusion_model.*)")
    dropped = sorted(k for k in sd if k.startswith("cond_stage_model.") or k in ("proj_out.weight", "proj_out.bias"))
    out = {k: v for k, v in sd.items() if k not in set(dropped)}
    width_key = CLIP_PREFIX + "embeddings.class_embedding"
    if width_key not in clip_sd:
        raise CheckpointMismatchError(f"--clip_from: the CLIP weights have no {width_key[len(CLIP_ROOT):]}")
    width = int(np.shape(clip_sd[width_key])[0])
    context_dim = _context_dim(sd)
    out.update(clip_sd)
    fresh = fresh_conditioner_tensors(width, context_dim, seed)
    out.update(fresh)
    record = {
        "recipe": "Stable Diffusion → Paint-by-Example (Paint-by-Example modify_checkpoints.py + main.py)",
        "dropped_sd_tensors": len(dropped),
        "mapper": {"width": width, "layers": MAPPER_LAYERS, "heads": 1},
        "context_dim": context_dim,
        "init": "torch defaults: Linear U(±1/sqrt(fan_in)), LayerNorm (1, 0), learnable_vector N(0, 1)",
        "init_seed": seed,
    }
    log.info("SD → Paint-by-Example: dropped %d text-encoder tensors; fresh mapper (%d × width %d), final_ln, "
             "proj_out (%d → %d) and unconditional vector (seed %d)", len(dropped), MAPPER_LAYERS, width, width,
             context_dim, seed)
    return out, record

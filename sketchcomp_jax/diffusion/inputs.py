"""The U-Net's spatial conditioning, exactly as the original builds it (training and sampling alike).

All arrays NHWC. `keep_mask`: 1 = keep, 0 = hole. Sketch: 3 channels in [-1, 1], white strokes (+1)
on black (-1). The 12-channel U-Net input is `[z_t(4), z_masked(4), keep_mask↓(1), sketch↓(3)]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of PyTorch's bilinear interpolation along one axis
    (`align_corners=False`, no antialias): src = (dst + 0.5)·in/out − 0.5, clamped at 0."""
    # float32 arithmetic, as PyTorch's CPU kernel does for float32 tensors.
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int32)
    i0 = np.minimum(i0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear_no_antialias(x: jax.Array, height: int, width: int) -> jax.Array:
    """NHWC bilinear resize with the semantics of torchvision 0.12's tensor `Resize` /
    `F.interpolate(mode='bilinear', align_corners=False, antialias=False)`.

    Down-sampling by an integer factor k averages the two centre source pixels of each k×k block
    per axis (e.g. rows 8i+3, 8i+4 for 512→64), so thin lines elsewhere vanish, as in the original.
    `jax.image.resize` antialiases when down-sampling and must not be used here.
    """
    def along(values: jax.Array, axis: int, out_size: int) -> jax.Array:
        in_size = values.shape[axis]
        if in_size == out_size:
            return values
        i0, i1, w1 = _axis_weights(in_size, out_size)
        shape = [1] * values.ndim
        shape[axis] = out_size
        w1 = jnp.asarray(w1).reshape(shape).astype(values.dtype)
        return jnp.take(values, i0, axis=axis) * (1 - w1) + jnp.take(values, i1, axis=axis) * w1

    return along(along(x, 1, height), 2, width)


def sketch_for_input(sketch: jax.Array, keep_mask: jax.Array, edge_type: str = "only_mask_region") -> jax.Array:
    """The original's `input_edge_type` rule (pixel space, before resizing).

    `only_mask_region` (the released config): `2·(((s+1)/2)·(1−m)) − 1` — strokes survive only inside
    the hole, −1 ("no edge") elsewhere. `full`: the sketch unchanged. `erase_mask_region`: strokes only
    outside the hole. `not_use`: all −1.
    """
    s01 = (sketch + 1.0) / 2.0
    if edge_type == "only_mask_region":
        return 2.0 * (s01 * (1.0 - keep_mask)) - 1.0
    if edge_type == "erase_mask_region":
        return 2.0 * (s01 * keep_mask) - 1.0
    if edge_type == "full":
        return sketch
    if edge_type == "not_use":
        return -jnp.ones_like(sketch)
    raise ValueError(f"unknown sketch edge type {edge_type!r}")


def latent_conditioning(
    keep_mask: jax.Array, sketch: jax.Array | None, latent_hw: tuple[int, int], edge_type: str = "only_mask_region"
) -> tuple[jax.Array, jax.Array | None]:
    """Pixel keep-mask (B,H,W,1) and sketch (B,H,W,3) → latent-size mask (B,h,w,1) and sketch (B,h,w,3).

    Both are resized with no-antialias bilinear, so the latent mask takes fractional values on
    block edges. `sketch=None` (Paint-by-Example, 9 channels) returns None for the sketch.
    """
    h, w = latent_hw
    mask_latent = resize_bilinear_no_antialias(keep_mask, h, w)
    if sketch is None:
        return mask_latent, None
    return mask_latent, resize_bilinear_no_antialias(sketch_for_input(sketch, keep_mask, edge_type), h, w)

"""The U-Net's spatial conditioning, exactly as the original builds it (training and sampling alike).

All arrays NHWC. `keep_mask`: 1 = keep, 0 = hole. Sketch: 3 channels in [-1, 1], white strokes (+1)
on black (-1). The 12-channel U-Net input is `[z_t(4), z_masked(4), keep_mask↓(1), sketch↓(3)]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sketchcomp_jax.ops.resize import resize_bilinear


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
    mask_latent = resize_bilinear(keep_mask, h, w)
    if sketch is None:
        return mask_latent, None
    return mask_latent, resize_bilinear(sketch_for_input(sketch, keep_mask, edge_type), h, w)


def posterior_latent_shape(moments: jax.Array) -> tuple[int, ...]:
    """(h, w, C): one image's latent (the posterior mean, and the `eps` of `masked_image_latent`) from the VAE
    encoder's moments (B, h, w, 2C)."""
    return (*moments.shape[1:-1], moments.shape[-1] // 2)


def masked_image_latent(moments: jax.Array, eps: jax.Array | None, scale_factor: float) -> jax.Array:
    """The U-Net's masked-image input from the VAE encoder's moments of `image * keep_mask` (B, h, w, 2C):
    `scale_factor * z` with z the posterior mean (`eps=None`, "mean" encoding) or the posterior draw
    `mean + std * eps` (`eps` standard normal, broadcastable to the mean; each caller draws it with its
    own key convention)."""
    from sketchcomp_jax.models.vae import DiagonalGaussian

    posterior = DiagonalGaussian(moments)
    z = posterior.mean if eps is None else posterior.mean + posterior.std * eps
    return scale_factor * z

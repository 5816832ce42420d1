"""The training objective exactly as the original `LatentDiffusion.p_losses` (Paint-by-Sketch).

* z0 = 0.18215 · posterior **sample** of VAE.encode(gt); z_masked likewise of gt · keep_mask;
* t ~ U{0..999} per sample; noise only on the 4 latent channels; z_t = q_sample(z0, t, ε);
* U-Net input `[z_t, z_masked, keep_mask↓, sketch_in_hole↓]` (bilinear, no antialias);
* context = proj_out(mapper(CLIP(reference))), replaced by the unconditional vector with p = 0.2 for
  the whole batch (one draw per step, as the original) or per sample (option);
* loss = mean((ε − ε̂)²) over all latent pixels and channels, averaged over the batch.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sketchcomp_jax.diffusion.inputs import latent_conditioning
from sketchcomp_jax.models.config import ModelConfig, Networks
from sketchcomp_jax.models.vae import AutoencoderKL, DiagonalGaussian


def diffusion_loss(
    params: dict[str, Any],
    batch: dict[str, jax.Array],
    rng: jax.Array,
    nets: Networks,
    config: ModelConfig,
    alphas_cumprod: jax.Array,
    uncond_prob: float = 0.2,
    per_sample_uncond: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """batch: `gt` (B,R,R,3) [-1,1], `keep_mask` (B,R,R,1), `sketch` (B,R,R,3) [-1,1], and `reference`
    (B,S,S,3) CLIP-normalised, or for the text baseline `tokens` (B,77) int32."""
    gt, keep = batch["gt"], batch["keep_mask"]
    b = gt.shape[0]
    r_gt, r_masked, r_t, r_noise, r_drop = jax.random.split(rng, 5)
    vae_params = jax.lax.stop_gradient(params["vae"])

    def encode(images, key):
        moments = nets.vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode)
        return config.scale_factor * DiagonalGaussian(moments).sample(key)

    z0 = encode(gt, r_gt)
    z_masked = encode(gt * keep, r_masked)
    h, w = z0.shape[1:3]
    mask_lat, sketch_lat = latent_conditioning(
        keep, batch["sketch"] if config.uses_sketch else None, (h, w), config.sketch_edge_type
    )
    t = jax.random.randint(r_t, (b,), 0, alphas_cumprod.shape[0])
    noise = jax.random.normal(r_noise, z0.shape, z0.dtype)
    acp = alphas_cumprod[t][:, None, None, None]
    z_t = jnp.sqrt(acp) * z0 + jnp.sqrt(1.0 - acp) * noise

    cond_vars = {"params": params["conditioner"]}
    context = nets.conditioner.apply(cond_vars, batch[config.conditioning_input])
    uncond = jnp.broadcast_to(params["conditioner"]["uncond_vector"].astype(context.dtype), context.shape)
    if per_sample_uncond:
        drop = jax.random.uniform(r_drop, (b, 1, 1)) < uncond_prob
    else:
        drop = jax.random.uniform(r_drop, ()) < uncond_prob
    context = jnp.where(drop, uncond, context)

    parts = [z_t, z_masked, mask_lat] + ([sketch_lat] if sketch_lat is not None else [])
    eps = nets.unet.apply({"params": params["unet"]}, jnp.concatenate(parts, axis=-1), t, context)
    loss = jnp.mean(jnp.square(noise - eps))
    return loss, {"loss": loss, "uncond_fraction": jnp.mean(jnp.broadcast_to(drop, (b, 1, 1)).astype(jnp.float32))}

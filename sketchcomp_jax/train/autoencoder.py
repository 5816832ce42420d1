"""Fitting a small, randomly initialised AutoencoderKL to a data set before diffusion training.

The released models use Stable Diffusion's VAE, trained before (and frozen during) the U-Net's training.
Tiny configs trained from scratch (the demo, the small-scale reproduction) have no such VAE; a random one
cannot reconstruct images, so every output would be noise whatever the U-Net learns. This fits one with
the LDM autoencoder's reconstruction objective minus the adversarial and perceptual terms: L1 of the
decoded posterior sample plus a small KL (weight 1e-6, as SD's `kl_weight`). Images come from the data
pipeline's `gt` crops (NHWC, [-1, 1]).
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sketchcomp_jax.models.vae import AutoencoderKL, DiagonalGaussian

log = logging.getLogger(__name__)
KL_WEIGHT = 1e-6


def autoencoder_loss(vae: AutoencoderKL, params: Any, images: jax.Array, rng: jax.Array) -> jax.Array:
    """L1(decode(sample(encode(x))), x) + 1e-6 · KL(q(z|x) ‖ N(0, I)) per image, averaged."""
    moments = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
    posterior = DiagonalGaussian(moments)
    recon = vae.apply({"params": params}, posterior.sample(rng), method=AutoencoderKL.decode)
    l1 = jnp.mean(jnp.abs(recon - images))
    kl = 0.5 * jnp.sum(posterior.mean**2 + posterior.std**2 - 1.0 - jnp.log(posterior.std**2), axis=(1, 2, 3))
    return l1 + KL_WEIGHT * jnp.mean(kl)


def fit_autoencoder(vae: AutoencoderKL, params: Any, images: Iterator[np.ndarray], steps: int, *,
                    learning_rate: float = 1e-3, seed: int = 0) -> tuple[Any, list[float]]:
    """`steps` Adam steps on batches from `images` ((B, H, W, 3) in [-1, 1]); returns (params, losses)."""
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch, rng):
        loss, grads = jax.value_and_grad(lambda p: autoencoder_loss(vae, p, batch, rng))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    base = jax.random.PRNGKey(seed)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jnp.asarray(next(images)), jax.random.fold_in(base, i))
        losses.append(float(loss))
        if (i + 1) % 50 == 0 or i + 1 == steps:
            log.info("autoencoder fit: step %d/%d, loss %.4f", i + 1, steps, np.mean(losses[-50:]))
    return jax.device_get(params), losses


def latent_std(vae: AutoencoderKL, params: Any, batches: list[np.ndarray], seed: int = 0) -> float:
    """Standard deviation of posterior samples of `batches` (as LDM's `scale_by_std` measures it)."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=AutoencoderKL.encode))
    samples = [np.asarray(DiagonalGaussian(encode(params, jnp.asarray(b))).sample(jax.random.PRNGKey(seed + i)))
               for i, b in enumerate(batches)]
    return float(np.std(np.concatenate([s.reshape(-1) for s in samples])))

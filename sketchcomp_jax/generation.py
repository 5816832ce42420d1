"""Batched generation from training-format batches: what the training loop's sample grids and the
evaluation use (the interactive `SketchCompositionPipeline` handles single user images).

A batch is NHWC float32, as the data pipeline makes it: `gt` (B, R, R, 3) in [-1, 1], `keep_mask`
(B, R, R, 1) with 1 = keep, `sketch` (B, R, R, 3) white-on-black in [-1, 1], `reference` (B, S, S, 3)
CLIP-normalised (or `tokens` (B, 77) int32 for the text baseline). The masked image `gt · keep_mask` is encoded, the conditioning built exactly as in
training, and the jitted sampler runs the whole loop; the result is decoded to [0, 1].
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.diffusion.inputs import latent_conditioning, masked_image_latent, posterior_latent_shape
from sketchcomp_jax.diffusion.samplers import SamplingCond, make_sampler
from sketchcomp_jax.diffusion.schedule import schedule_for
from sketchcomp_jax.models.config import ModelConfig, Networks
from sketchcomp_jax.models.vae import AutoencoderKL


class BatchGenerator:
    """`generator(params, batch, sample_ids, seed=0)` → (B, R, R, 3) float32 images in [0, 1].

    Sampler settings are fixed per object, so the sampling loop compiles once per batch shape. Each
    sample's initial noise and posterior draw depend only on (seed, its id), not on the batch it is
    in, so results are reproducible across batch sizes and resumed evaluations.

    Data-parallel: with `mesh`, every batch is split over all of the mesh's devices (padded with copies
    of its last element up to a multiple of `mesh.size`; the padding's images are dropped) and `params`
    must already be laid out on that mesh (e.g. replicated, `NamedSharding(mesh, P())`). The mesh's
    devices must be this process's own (`jax.local_devices()`): each host generates its share alone.
    """

    def __init__(self, config: ModelConfig, nets: Networks, *, sampler: str = "plms", steps: int = 50,
                 guidance_scale: float = 5.0, sketch_drop_after: float = 1.0, drop_value: float = 0.0,
                 eta: float = 0.0, vae_encode: str = "sample", mesh: jax.sharding.Mesh | None = None):
        if vae_encode not in ("sample", "mean"):
            raise ValueError(f"vae_encode must be 'sample' or 'mean', got {vae_encode!r}")
        self.mesh = mesh
        # The batch axis split over every device of the mesh (all its axes together).
        self._batch_sharding = (None if mesh is None else
                                jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names)))
        self.config = config
        self.nets = nets
        self.guidance_scale = float(guidance_scale)
        self.vae_encode = vae_encode
        self.eta = float(eta)
        acp = schedule_for(config.schedule)["alphas_cumprod"]
        unet = nets.unet
        self._run = make_sampler(
            lambda p, x, t, c: unet.apply({"params": p}, x, t, c), sampler=sampler, num_steps=int(steps),
            sketch_drop_after=float(sketch_drop_after), drop_value=float(drop_value), eta=self.eta,
            use_cfg=self.guidance_scale != 1.0, alphas_cumprod=acp,
        )
        self._prepare = jax.jit(self._prepare_impl)
        # Per-sample keys fold_in(PRNGKey(seed), id), compiled once (eager ops on sharded ids would be dispatched
        # anew at every call).
        self._keys = jax.jit(lambda base, ids: jax.vmap(lambda i: jax.random.fold_in(base, i))(ids))
        if mesh is not None:
            # Each device runs the whole single-device generation on its slice of the batch (shard_map): no
            # cross-device traffic at all, where GSPMD would reshard at every step (classifier-free guidance
            # concatenates the conditional and unconditional halves along the batch).
            batch, rep = jax.sharding.PartitionSpec(mesh.axis_names), jax.sharding.PartitionSpec()
            self._sharded_images = jax.jit(jax.shard_map(
                lambda p, x, k, r: self.images(p, x, k, r if self.eta > 0 else None), mesh=mesh,
                in_specs=(rep, batch, batch, rep), out_specs=batch, check_vma=False))
        self._decode = jax.jit(
            lambda p, z: nets.vae.apply({"params": p}, (1.0 / config.scale_factor) * z, method=AutoencoderKL.decode)
        )

    def _prepare_impl(self, params: Mapping[str, Any], batch: Mapping[str, jax.Array], keys: jax.Array):
        cfg, nets = self.config, self.nets
        keep = batch["keep_mask"]
        moments = nets.vae.apply({"params": params["vae"]}, batch["gt"] * keep, method=AutoencoderKL.encode)
        lat = cfg.latent_size
        noise_shape = (lat, lat, cfg.unet.out_channels)
        x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), noise_shape))(keys)
        eps = None
        if self.vae_encode != "mean":
            latent_shape = posterior_latent_shape(moments)
            eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), latent_shape))(keys)
        z_masked = masked_image_latent(moments, eps, cfg.scale_factor)
        mask_lat, sketch_lat = latent_conditioning(keep, batch["sketch"] if cfg.uses_sketch else None, (lat, lat),
                                                   cfg.sketch_edge_type)
        context = nets.conditioner.apply({"params": params["conditioner"]}, batch[cfg.conditioning_input])
        uncond = jnp.broadcast_to(params["conditioner"]["uncond_vector"], context.shape)
        cond = SamplingCond(z_masked, mask_lat, sketch_lat, context, uncond)
        return x_T, cond

    def images(self, params: Mapping[str, Any], inputs: Mapping[str, jax.Array], keys: jax.Array,
               rng: jax.Array | None = None) -> jax.Array:
        """The whole generation as one traceable function, for callers that jit it with their own shardings
        (the training loop's sample grids over the mesh). `inputs`: the batch arrays `__call__` reads; `keys`
        (B, 2): per-sample keys `fold_in(PRNGKey(seed), id)`; `rng`: the η > 0 key → (B, R, R, 3) in [0, 1]."""
        x_T, cond = self._prepare_impl(params, inputs, keys)
        latents = self._run(params["unet"], x_T, cond, jnp.float32(self.guidance_scale), rng)
        decoded = self._decode(params["vae"], latents).astype(jnp.float32)
        return jnp.clip((decoded + 1.0) / 2.0, 0.0, 1.0)

    def __call__(self, params: Mapping[str, Any], batch: Mapping[str, Any], sample_ids: Sequence[int],
                 seed: int = 0) -> np.ndarray:
        ids = np.asarray(sample_ids, np.uint32)
        if ids.shape != (np.asarray(batch["gt"]).shape[0],):
            raise ValueError(f"need one sample id per batch element: {ids.shape} ids for {np.asarray(batch['gt']).shape[0]} images")
        n = len(ids)
        names = ("gt", "keep_mask", "sketch", self.config.conditioning_input)
        arrays = {k: np.asarray(batch[k]) for k in names}
        base = jax.random.PRNGKey(seed)
        if self._batch_sharding is None:
            inputs = {k: jnp.asarray(v) for k, v in arrays.items()}
            keys = self._keys(base, jnp.asarray(ids))
        else:
            pad = -n % self.mesh.size
            if pad:  # repeat the last element: per-sample keys keep the real samples' results unchanged
                ids = np.concatenate([ids, np.repeat(ids[-1:], pad)])
                arrays = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in arrays.items()}
            inputs = jax.device_put(arrays, self._batch_sharding)
            keys = self._keys(base, jax.device_put(ids, self._batch_sharding))
            rng = jax.random.fold_in(base, 2**31 - 1)  # replicated; used only with eta > 0
            return np.asarray(self._sharded_images(params, inputs, keys, rng), np.float32)[:n]
        x_T, cond = self._prepare(params, inputs, keys)
        rng = jax.random.fold_in(base, 2**31 - 1) if self.eta > 0 else None
        latents = self._run(params["unet"], x_T, cond, jnp.float32(self.guidance_scale), rng)
        decoded = np.asarray(self._decode(params["vae"], latents), np.float32)[:n]
        return np.clip((decoded + 1.0) / 2.0, 0.0, 1.0)

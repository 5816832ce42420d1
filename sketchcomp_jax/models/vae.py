"""LDM `AutoencoderKL` (first stage) in Flax Linen, NHWC, with the diagonal Gaussian posterior.

Images are (B, H, W, 3) in [-1, 1]; latents are (B, H/f, W/f, z_channels) where f = 2**(len(ch_mult)-1).
`encode` returns the posterior *moments* (B, h, w, 2·embed_dim); `DiagonalGaussian` turns them into
`mean`/`std`/`sample`. The 0.18215 scale is applied by the callers (`encode_to_latent`, `decode_latent`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sketchcomp_jax.models.layers import GroupNorm, conv, upsample_nearest_2x

Dtype = Any
SCALE_FACTOR = 0.18215


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKL(embed_dim, ddconfig)` of the original (defaults: the SD v1 VAE)."""

    embed_dim: int = 4
    z_channels: int = 4
    double_z: bool = True
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 256

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(sorted(set(self.attn_resolutions))))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class VAEResBlock(nn.Module):
    """`ResnetBlock` without time embedding: GN(1e-6)→swish→conv, GN→swish→conv, + (1×1 nin_shortcut)."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = conv(self.out_channels, "conv1", self.dtype)(nn.silu(GroupNorm(32, 1e-6, name="norm1")(x)))
        h = conv(self.out_channels, "conv2", self.dtype)(nn.silu(GroupNorm(32, 1e-6, name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "nin_shortcut", self.dtype, kernel_size=1, padding=0)(x)
        return x + h


class VAEAttention(nn.Module):
    """`AttnBlock`: single-head self-attention over all pixels with 1×1-conv q/k/v/proj_out (as Dense)."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = GroupNorm(32, 1e-6, name="norm")(x).reshape(batch, height * width, channels)
        q = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32, name="q")(h)
        k = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32, name="k")(h)
        v = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32, name="v")(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) * (int(channels) ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v)
        out = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32, name="proj_out")(out)
        return x + out.reshape(batch, height, width, channels)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = conv(cfg.ch, "conv_in", self.dtype)(x)
        resolution = cfg.resolution
        ch = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            ch = cfg.ch * mult
            for i in range(cfg.num_res_blocks):
                h = VAEResBlock(ch, self.dtype, name=f"down_{level}_block_{i}")(h)
                if resolution in cfg.attn_resolutions:
                    h = VAEAttention(self.dtype, name=f"down_{level}_attn_{i}")(h)
            if level != len(cfg.ch_mult) - 1:
                # torch: F.pad(x, (0, 1, 0, 1)) then a 3x3 stride-2 conv without padding.
                h = conv(ch, f"down_{level}_downsample", self.dtype, stride=2, padding=((0, 1), (0, 1)))(h)
                resolution //= 2
        h = VAEResBlock(ch, self.dtype, name="mid_block_1")(h)
        h = VAEAttention(self.dtype, name="mid_attn_1")(h)
        h = VAEResBlock(ch, self.dtype, name="mid_block_2")(h)
        h = nn.silu(GroupNorm(32, 1e-6, name="norm_out")(h))
        out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        return conv(out, "conv_out", self.dtype)(h)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        ch = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // cfg.downsample_factor
        h = conv(ch, "conv_in", self.dtype)(z)
        h = VAEResBlock(ch, self.dtype, name="mid_block_1")(h)
        h = VAEAttention(self.dtype, name="mid_attn_1")(h)
        h = VAEResBlock(ch, self.dtype, name="mid_block_2")(h)
        for level in reversed(range(len(cfg.ch_mult))):
            ch = cfg.ch * cfg.ch_mult[level]
            for i in range(cfg.num_res_blocks + 1):
                h = VAEResBlock(ch, self.dtype, name=f"up_{level}_block_{i}")(h)
                if resolution in cfg.attn_resolutions:
                    h = VAEAttention(self.dtype, name=f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = conv(ch, f"up_{level}_upsample", self.dtype)(upsample_nearest_2x(h))
                resolution *= 2
        h = nn.silu(GroupNorm(32, 1e-6, name="norm_out")(h))
        return conv(cfg.out_ch, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """Frozen first stage. Methods (call via `apply(..., method=...)`):

    * `encode(images (B,H,W,3) in [-1,1]) → moments (B,h,w,2·embed_dim)` (= `quant_conv(encoder(x))`);
    * `decode(z (B,h,w,embed_dim), unscaled) → images (B,H,W,3)` (= `decoder(post_quant_conv(z))`).
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        self.quant_conv = conv(2 * cfg.embed_dim, "quant_conv", self.dtype, kernel_size=1, padding=0)
        self.post_quant_conv = conv(cfg.z_channels, "post_quant_conv", self.dtype, kernel_size=1, padding=0)

    def encode(self, images: jax.Array) -> jax.Array:
        return self.quant_conv(self.encoder(images.astype(self.dtype))).astype(jnp.float32)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(self.post_quant_conv(z.astype(self.dtype))).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        moments = self.encode(images)
        return self.decode(DiagonalGaussian(moments).mean)


@jax.tree_util.register_pytree_node_class
class DiagonalGaussian:
    """LDM `DiagonalGaussianDistribution` over NHWC moments `[mean | logvar]` (split on channels)."""

    def __init__(self, moments: jax.Array):
        self.moments = moments
        mean, logvar = jnp.split(moments, 2, axis=-1)
        self.mean = mean
        self.logvar = jnp.clip(logvar, -30.0, 20.0)
        self.std = jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """`mean + std · N(0, 1)` (the original draws fresh noise with `torch.randn`)."""
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def tree_flatten(self):
        return (self.moments,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def encode_to_latent(
    vae: AutoencoderKL,
    vae_params: Any,
    images: jax.Array,
    rng: jax.Array | None = None,
    scale_factor: float = SCALE_FACTOR,
) -> jax.Array:
    """Images (B,H,W,3) in [-1,1] → scaled latents `scale_factor · z` (B,h,w,embed_dim).

    With `rng` the posterior is sampled (the original's `get_first_stage_encoding`); without it the
    posterior mean is used (deterministic; what the golden fixtures use).
    """
    posterior = DiagonalGaussian(vae.apply({"params": vae_params}, images, method=AutoencoderKL.encode))
    z = posterior.mean if rng is None else posterior.sample(rng)
    return scale_factor * z


def decode_latent(
    vae: AutoencoderKL, vae_params: Any, latents: jax.Array, scale_factor: float = SCALE_FACTOR
) -> jax.Array:
    """Scaled latents (B,h,w,C) → images (B,H,W,3), roughly in [-1,1] (unclipped). Multiplies by
    `1/scale_factor` as the original's `decode_first_stage` does (rather than dividing)."""
    return vae.apply({"params": vae_params}, (1.0 / scale_factor) * latents, method=AutoencoderKL.decode)

"""Building blocks shared by the U-Net, the VAE and the CLIP encoders (Flax Linen, NHWC).

Every module here mirrors one PyTorch module of the original code so that weights map one-to-one:
`Conv` ↔ `nn.Conv2d` (kernel HWIO ↔ OIHW), `nn.Dense` ↔ `nn.Linear` (kernel (in, out) ↔ (out, in)),
`GroupNorm` ↔ `nn.GroupNorm` (scale/bias ↔ weight/bias), `LayerNorm` ↔ `nn.LayerNorm`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(
    features: int,
    name: str,
    dtype: Dtype,
    kernel_size: int = 3,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 1,
    use_bias: bool = True,
) -> nn.Conv:
    """A 2-D `nn.Conv` on NHWC input with PyTorch padding semantics and float32 master weights.

    `padding` is PyTorch's symmetric integer `padding=`, or explicit ((top, bottom), (left, right))
    pairs, e.g. the VAE's asymmetric (0, 1, 0, 1) down-sampling pad.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class GroupNorm(nn.Module):
    """PyTorch `nn.GroupNorm` over the channel (last) axis of NHWC or (B, T, C) input.

    Statistics are computed in float32 whatever the compute dtype (the original's GroupNorm32 casts
    to float32 too), and the result is cast back to the input dtype.
    """

    num_groups: int = 32
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        in_dtype = x.dtype
        h = x.astype(jnp.float32)
        spatial = tuple(range(1, h.ndim - 1))
        group_size = channels // self.num_groups

        def group_mean(values: jax.Array) -> jax.Array:
            # Reduce spatial axes first (contiguous in NHWC), then the channels of each group: much
            # faster on CPU than one reduction over a (…, groups, group_size) view.
            per_channel = values.mean(axis=spatial)
            per_group = per_channel.reshape(-1, self.num_groups, group_size).mean(axis=-1, keepdims=True)
            per_group = jnp.broadcast_to(per_group, per_group.shape[:-1] + (group_size,))
            return per_group.reshape((h.shape[0],) + (1,) * len(spatial) + (channels,))

        mean = group_mean(h)
        centred = h - mean
        var = group_mean(jnp.square(centred))
        h = centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return h.astype(in_dtype)


class LayerNorm(nn.Module):
    """PyTorch `nn.LayerNorm` over the last axis, computed in float32 and cast back to the input dtype."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (width,), jnp.float32)
        h = x.astype(jnp.float32)
        mean = h.mean(axis=-1, keepdims=True)
        var = jnp.square(h - mean).mean(axis=-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return h.astype(x.dtype)


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A `nn.Dense` with float32 master weights and the given compute dtype."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


def gelu_exact(x: jax.Array) -> jax.Array:
    """PyTorch `nn.GELU()` / `F.gelu` default: the exact erf form (not the tanh approximation)."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's `quick_gelu`: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact, "gelu_new": lambda x: jax.nn.gelu(x, approximate=True)}


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour ×2 up-sampling of NHWC input (PyTorch `F.interpolate(scale_factor=2, mode='nearest')`)."""
    x = jnp.repeat(x, 2, axis=1)
    return jnp.repeat(x, 2, axis=2)


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep embedding exactly as LDM's `timestep_embedding`: **cos first**.

    timesteps: (B,) int or float → (B, dim) float32, `[cos(t·f), sin(t·f)]` with
    `f = exp(-ln(max_period) · arange(half) / half)`; a zero column is appended when dim is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb

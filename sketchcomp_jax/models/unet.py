"""Stable Diffusion v1/v2 U-Net (LDM `openaimodel.UNetModel`) in Flax Linen, NHWC.

The block structure is described once, by `unet_layout(config)`, and consumed both by the Flax module
and by the checkpoint key map (`weights/ldm_keys.py`), so the two cannot drift apart.

Input channel order for Paint-by-Sketch (12 channels): `[z_t(4), z_masked(4), keep_mask(1), sketch(3)]`;
Paint-by-Example uses the first 9, plain SD the first 4.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sketchcomp_jax.models.attention import attention
from sketchcomp_jax.models.layers import (
    GroupNorm,
    LayerNorm,
    conv,
    dense,
    gelu_exact,
    timestep_embedding,
    upsample_nearest_2x,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of `ldm.modules.diffusionmodules.openaimodel.UNetModel` (spatial-transformer form).

    `attention_resolutions` are down-sampling factors (1 = full latent resolution) as in the original
    YAML. Heads follow the original: with `num_head_channels == -1` every attention layer has
    `num_heads` heads of `ch // num_heads` channels (SD v1); otherwise `ch // num_head_channels` heads
    of `num_head_channels` (SD v2). `use_linear_projection` selects Linear `proj_in/out` (SD v2)
    instead of 1×1 convs (SD v1); the math is the same, only the checkpoint shapes differ.
    """

    in_channels: int = 12
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_heads: int = 8
    num_head_channels: int = -1
    context_dim: int = 768
    transformer_depth: int = 1
    use_linear_projection: bool = False
    legacy: bool = False

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        # A set of factors in the original; kept sorted so equal configs compare equal.
        object.__setattr__(self, "attention_resolutions", tuple(sorted(set(self.attention_resolutions))))
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("UNetConfig: set either num_heads or num_head_channels")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(num_heads, dim_head) of an attention layer with `channels` channels, as the original computes it."""
        if self.num_head_channels == -1:
            num_heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            num_heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // num_heads
        return num_heads, dim_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ResSpec:
    in_channels: int
    out_channels: int


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    channels: int
    num_heads: int
    dim_head: int


@dataclasses.dataclass(frozen=True)
class DownSpec:
    channels: int


@dataclasses.dataclass(frozen=True)
class UpSpec:
    channels: int


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One `TimestepEmbedSequential` of the original: `layers[j]` is the module at index j."""

    layers: tuple[Any, ...]
    skip_channels: int = 0  # channels concatenated from the encoder (output blocks only)


@dataclasses.dataclass(frozen=True)
class UNetLayout:
    input_blocks: tuple[BlockSpec, ...]  # input_blocks[0] is the stem conv (layers empty)
    middle_block: BlockSpec
    output_blocks: tuple[BlockSpec, ...]


def unet_layout(cfg: UNetConfig) -> UNetLayout:
    """The original UNetModel's block list, level by level, with channel counts and head sizes."""
    ch = cfg.model_channels
    input_blocks = [BlockSpec(layers=())]
    skip_chans = [ch]
    ds = 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[Any] = [ResSpec(ch, mult * cfg.model_channels)]
            ch = mult * cfg.model_channels
            if ds in cfg.attention_resolutions:
                layers.append(AttnSpec(ch, *cfg.heads_for(ch)))
            input_blocks.append(BlockSpec(tuple(layers)))
            skip_chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            input_blocks.append(BlockSpec((DownSpec(ch),)))
            skip_chans.append(ch)
            ds *= 2
    middle = BlockSpec((ResSpec(ch, ch), AttnSpec(ch, *cfg.heads_for(ch)), ResSpec(ch, ch)))
    output_blocks = []
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
        for i in range(cfg.num_res_blocks + 1):
            skip = skip_chans.pop()
            layers = [ResSpec(ch + skip, cfg.model_channels * mult)]
            ch = cfg.model_channels * mult
            if ds in cfg.attention_resolutions:
                layers.append(AttnSpec(ch, *cfg.heads_for(ch)))
            if level and i == cfg.num_res_blocks:
                layers.append(UpSpec(ch))
                ds //= 2
            output_blocks.append(BlockSpec(tuple(layers), skip_channels=skip))
    return UNetLayout(tuple(input_blocks), middle, tuple(output_blocks))


class ResBlock(nn.Module):
    """LDM ResBlock (`use_scale_shift_norm=False`): GN→SiLU→conv, + Linear(SiLU(emb)), GN→SiLU→conv, + skip."""

    out_channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm(32, 1e-5, name="in_norm")(x))
        h = conv(self.out_channels, "in_conv", self.dtype)(h)
        emb_out = dense(self.out_channels, "emb_proj", self.dtype)(nn.silu(emb))
        h = h + emb_out[:, None, None, :].astype(h.dtype)
        h = nn.silu(GroupNorm(32, 1e-5, name="out_norm")(h))
        h = conv(self.out_channels, "out_conv", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, "skip", self.dtype, kernel_size=1, padding=0)(x)
        return x + h


class CrossAttention(nn.Module):
    """LDM CrossAttention: bias-free q/k/v, biased output projection, scale dim_head**-0.5.

    `attention` names the backend (`models.attention.BACKENDS`) and `platform` the target platform
    (None: the mesh in context, else the default backend)."""

    num_heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        context = x if context is None else context
        inner = self.num_heads * self.dim_head
        q = dense(inner, "to_q", self.dtype, use_bias=False)(x)
        k = dense(inner, "to_k", self.dtype, use_bias=False)(context)
        v = dense(inner, "to_v", self.dtype, use_bias=False)(context)
        out = attention(q, k, v, self.num_heads, scale=self.dim_head**-0.5, backend=self.attention,
                        platform=self.platform)
        return dense(x.shape[-1], "to_out", self.dtype)(out)


class TransformerBlock(nn.Module):
    """LDM BasicTransformerBlock: self-attn, cross-attn, GEGLU feed-forward, each pre-LN + residual."""

    num_heads: int
    dim_head: int
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        attn = (self.num_heads, self.dim_head, self.dtype, self.attention, self.platform)
        x = x + CrossAttention(*attn, name="attn1")(LayerNorm(name="norm1")(x))
        x = x + CrossAttention(*attn, name="attn2")(
            LayerNorm(name="norm2")(x), context.astype(x.dtype)
        )
        h = dense(dim * 8, "ff_in", self.dtype)(LayerNorm(name="norm3")(x))
        value, gate = jnp.split(h, 2, axis=-1)
        return x + dense(dim, "ff_out", self.dtype)(value * gelu_exact(gate))


class SpatialTransformer(nn.Module):
    """LDM SpatialTransformer: GN(eps 1e-6) → proj_in → transformer blocks → proj_out → + residual.

    proj_in/proj_out are per-pixel linear maps (a 1×1 conv in SD v1 checkpoints, a Linear in SD v2).
    """

    num_heads: int
    dim_head: int
    depth: int = 1
    dtype: Dtype = jnp.float32
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        inner = self.num_heads * self.dim_head
        h = GroupNorm(32, 1e-6, name="norm")(x)
        h = dense(inner, "proj_in", self.dtype)(h).reshape(batch, height * width, inner)
        for d in range(self.depth):
            h = TransformerBlock(self.num_heads, self.dim_head, self.dtype, self.attention, self.platform,
                                 name=f"transformer_blocks_{d}")(h, context)
        h = dense(channels, "proj_out", self.dtype)(h).reshape(batch, height, width, channels)
        return x + h


class UNet(nn.Module):
    """ε-prediction U-Net. `__call__(x (B,H,W,Cin), timesteps (B,), context (B,T,context_dim)) → (B,H,W,Cout)`.

    `remat=True` recomputes each block's activations in the backward pass (the original's
    `use_checkpoint`); `dtype` is the compute dtype (parameters stay float32; GroupNorm, LayerNorm and
    softmax run in float32). The output is float32. `attention` is the attention backend
    (`models.attention.BACKENDS`; "auto" picks per layer) and `platform` the platform it is compiled
    for (None: the mesh in context, else `jax.default_backend()`).
    """

    config: UNetConfig
    dtype: Dtype = jnp.float32
    remat: bool = False
    attention: str = "auto"
    platform: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"UNet expects NHWC input with {cfg.in_channels} channels, got shape {tuple(x.shape)}"
            )
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"UNet expects context (B, T, {cfg.context_dim}), got shape {tuple(context.shape)}")
        levels = len(cfg.channel_mult) - 1
        if x.shape[1] % (2**levels) or x.shape[2] % (2**levels):
            raise ValueError(f"UNet: latent size {x.shape[1:3]} must be divisible by {2 ** levels}")
        layout = unet_layout(cfg)
        timesteps = jnp.broadcast_to(timesteps, (x.shape[0],))
        t_emb = timestep_embedding(timesteps, cfg.model_channels)
        emb = dense(cfg.model_channels * 4, "time_embed_0", self.dtype)(t_emb.astype(self.dtype))
        emb = dense(cfg.model_channels * 4, "time_embed_2", self.dtype)(nn.silu(emb))

        h = x.astype(self.dtype)
        context = context.astype(self.dtype)
        h = conv(cfg.model_channels, "input_blocks_0", self.dtype)(h)
        skips = [h]
        for idx, block in enumerate(layout.input_blocks[1:], start=1):
            h = self._block(block, f"input_blocks_{idx}", h, emb, context)
            skips.append(h)
        h = self._block(layout.middle_block, "middle_block", h, emb, context)
        for idx, block in enumerate(layout.output_blocks):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = self._block(block, f"output_blocks_{idx}", h, emb, context)
        h = nn.silu(GroupNorm(32, 1e-5, name="out_norm")(h))
        h = conv(cfg.out_channels, "out_conv", self.dtype)(h)
        return h.astype(jnp.float32)

    def _block(self, block: BlockSpec, prefix: str, h: jax.Array, emb: jax.Array, context: jax.Array) -> jax.Array:
        res_cls = nn.remat(ResBlock) if self.remat else ResBlock
        attn_cls = nn.remat(SpatialTransformer, static_argnums=()) if self.remat else SpatialTransformer
        for j, layer in enumerate(block.layers):
            name = f"{prefix}_{j}"
            if isinstance(layer, ResSpec):
                h = res_cls(layer.out_channels, self.dtype, name=name)(h, emb)
            elif isinstance(layer, AttnSpec):
                h = attn_cls(layer.num_heads, layer.dim_head, self.config.transformer_depth, self.dtype, self.attention,
                             self.platform, name=name)(h, context)
            elif isinstance(layer, DownSpec):
                h = conv(layer.channels, name, self.dtype, stride=2)(h)
            elif isinstance(layer, UpSpec):
                h = conv(layer.channels, name, self.dtype)(upsample_nearest_2x(h))
            else:  # pragma: no cover - layout only produces the types above
                raise TypeError(layer)
        return h


def count_params(params: Any) -> int:
    """Total number of scalar parameters in a pytree."""
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)))

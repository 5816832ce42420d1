"""PiDiNet (Su et al., "Pixel Difference Networks for Efficient Edge Detection", ICCV 2021) in Flax Linen.

This is the network that Paint-by-Sketch uses to extract its training sketches (SPEC §3.7): the full
PiDiNet (60 base channels) with the ``carv4`` pixel-difference layout, CDCM with 24 channels (``--dil``)
and CSAM (``--sa``), in its *converted* form, where every pixel-difference convolution has been
re-parameterised into a vanilla depth-wise convolution (``cd``/``ad``/``cv`` -> 3x3, ``rd`` -> 5x5 with
padding 2). The weights conversion lives in :mod:`sketchcomp_jax.weights.pidinet_weights`.

Layout and semantics
--------------------
* Input: ``(B, H, W, 3)`` float32 NHWC, already normalised (``x/255`` then ImageNet mean/std, see
  :func:`sketchcomp_jax.data.sketches.preprocess_pidinet`). Any ``H, W >= 8`` (odd sizes included).
* Output of ``apply``: a ``(B, H, W, 5)`` float32 array of sigmoid probabilities whose channels are
  ``[e1, e2, e3, e4, fuse]``: the four side outputs (after bilinear up-sampling to ``H x W``) and the
  fused edge map. Channel 4 (``PIDINET_FUSE``) is the edge map that PiDiNet's ``test()`` saves.
* Down-sampling is ``MaxPool2d(kernel_size=2, stride=2)`` in PyTorch's default floor mode: an odd row or
  column at the bottom/right is dropped (``padding='VALID'`` here).
* Side outputs are up-sampled with PyTorch ``F.interpolate(mode='bilinear', align_corners=False)``
  semantics (source coordinate ``(dst + 0.5) * in/out - 0.5`` clamped at 0, neighbours clamped at the
  border), by the project's one resize, ``ops.resize.resize_bilinear``.

Parameter tree (mirrors the PyTorch module names one-to-one; kernels HWIO)::

    init_block                       Conv 3x3, 3 -> 60, no bias
    block{s}_{j}/conv1               depth-wise Conv 3x3 (5x5 for the rd layers), no bias
    block{s}_{j}/conv2               Conv 1x1, no bias
    block{2,3,4}_1/shortcut          Conv 1x1 with bias (only the stride-2 blocks)
    dilations_{i}/conv1              Conv 1x1 with bias;  conv2_{1..4}: Conv 3x3 dilation 5/7/9/11
    attentions_{i}/conv1             Conv 1x1 with bias;  conv2: Conv 3x3, no bias
    conv_reduces_{i}/conv            Conv 1x1 with bias
    classifier                       Conv 1x1 4 -> 1 with bias

The module holds no state: ``PiDiNet().apply({'params': params}, x)`` is a pure function and jittable.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sketchcomp_jax.ops.resize import resize_bilinear

__all__ = [
    "CARV4_PDCS",
    "PIDINET_FUSE",
    "PIDINET_OUTPUTS",
    "PiDiNet",
]

# Pixel-difference type of init_block, block1_1 .. block4_4 in the ``carv4`` configuration.
CARV4_PDCS: tuple[str, ...] = ("cd", "ad", "rd", "cv") * 4

# Names of the five output channels, and the index of the fused edge map.
PIDINET_OUTPUTS: tuple[str, ...] = ("e1", "e2", "e3", "e4", "fuse")
PIDINET_FUSE = 4

# (stage, number of blocks) of the backbone.
_STAGES: tuple[tuple[int, int], ...] = ((1, 3), (2, 4), (3, 4), (4, 4))


def _conv(
    features: int,
    kernel: int,
    name: str,
    *,
    padding: int = 0,
    dilation: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    precision: Any = None,
    dtype: Any = jnp.float32,
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=use_bias,
        precision=precision,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


class PDCBlockConverted(nn.Module):
    """Residual block: [maxpool 2x2] -> depth-wise conv1 -> ReLU -> 1x1 conv2, + (shortcut 1x1) input."""

    pdc: str
    in_channels: int
    out_channels: int
    stride: int = 1
    precision: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride > 1:
            # nn.MaxPool2d(kernel_size=2, stride=2): floor mode, the odd last row/column is dropped.
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        kernel, pad = (5, 2) if self.pdc == "rd" else (3, 1)
        y = _conv(self.in_channels, kernel, "conv1", padding=pad, groups=self.in_channels, use_bias=False,
                  precision=self.precision, dtype=self.dtype)(x)
        y = nn.relu(y)
        y = _conv(self.out_channels, 1, "conv2", use_bias=False, precision=self.precision, dtype=self.dtype)(y)
        if self.stride > 1:
            x = _conv(self.out_channels, 1, "shortcut", precision=self.precision, dtype=self.dtype)(x)
        return y + x


class CDCM(nn.Module):
    """Compact Dilation Convolution Module: ReLU -> 1x1 conv -> sum of 3x3 convs dilated 5, 7, 9, 11."""

    channels: int
    precision: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv(self.channels, 1, "conv1", precision=self.precision, dtype=self.dtype)(nn.relu(x))
        out = None
        for j, d in enumerate((5, 7, 9, 11), start=1):
            y = _conv(self.channels, 3, f"conv2_{j}", padding=d, dilation=d, use_bias=False,
                      precision=self.precision, dtype=self.dtype)(x)
            out = y if out is None else out + y
        return out


class CSAM(nn.Module):
    """Compact Spatial Attention Module: x * sigmoid(conv3x3(conv1x1(relu(x))))."""

    mid_channels: int = 4
    precision: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = _conv(self.mid_channels, 1, "conv1", precision=self.precision, dtype=self.dtype)(nn.relu(x))
        y = _conv(1, 3, "conv2", padding=1, use_bias=False, precision=self.precision, dtype=self.dtype)(y)
        return x * nn.sigmoid(y)


class MapReduce(nn.Module):
    """1x1 conv to a single-channel (pre-sigmoid) edge map."""

    precision: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(1, 1, "conv", precision=self.precision, dtype=self.dtype)(x)


class PiDiNet(nn.Module):
    """Converted PiDiNet with CDCM and CSAM (defaults: the ``pidinet_converted --config carv4 --sa --dil``
    model of the ``table5`` checkpoint).

    ``__call__(x)`` with ``x`` a normalised ``(B, H, W, 3)`` image returns ``(B, H, W, 5)`` sigmoid maps
    ``[e1, e2, e3, e4, fuse]`` (see the module docstring). ``precision`` is passed to every convolution;
    the default ``HIGHEST`` keeps float32 accuracy on GPUs/TPUs (no TF32 / bf16 passes), which is what
    the golden parity needs; set ``None`` for the backend default.
    """

    base_channels: int = 60
    pdcs: Sequence[str] = CARV4_PDCS
    dil: int = 24
    mid_attention: int = 4
    precision: Any = jax.lax.Precision.HIGHEST
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"PiDiNet expects a (B, H, W, 3) NHWC image, got shape {x.shape}")
        if len(self.pdcs) != 16:
            raise ValueError(f"pdcs must name 16 layers (init_block + 15 blocks), got {len(self.pdcs)}")
        height, width = x.shape[1], x.shape[2]
        if height < 8 or width < 8:
            raise ValueError(f"PiDiNet needs an image of at least 8x8 pixels (3 poolings), got {height}x{width}")
        kw = dict(precision=self.precision, dtype=self.dtype)
        x = x.astype(self.dtype)

        kernel, pad = (5, 2) if self.pdcs[0] == "rd" else (3, 1)
        x = _conv(self.base_channels, kernel, "init_block", padding=pad, use_bias=False, **kw)(x)

        features = []
        channels = self.base_channels
        layer = 1
        for stage, n_blocks in _STAGES:
            for j in range(1, n_blocks + 1):
                in_ch = channels
                stride = 1
                if j == 1 and stage > 1:
                    stride = 2
                    if stage < 4:  # stages 2 and 3 double the width; stage 4 keeps 4C
                        channels *= 2
                x = PDCBlockConverted(self.pdcs[layer], in_ch, channels, stride=stride,
                                      name=f"block{stage}_{j}", **kw)(x)
                layer += 1
            features.append(x)

        logits = []
        for i, xi in enumerate(features):
            y = CDCM(self.dil, name=f"dilations_{i}", **kw)(xi)
            y = CSAM(self.mid_attention, name=f"attentions_{i}", **kw)(y)
            e = MapReduce(name=f"conv_reduces_{i}", **kw)(y)
            logits.append(resize_bilinear(e, height, width))
        side = jnp.concatenate(logits, axis=-1)  # (B, H, W, 4)
        fuse = _conv(1, 1, "classifier", **kw)(side)
        return nn.sigmoid(jnp.concatenate([side, fuse], axis=-1).astype(jnp.float32))

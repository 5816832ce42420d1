"""The FID Inception-V3 (pool3 features) in Flax Linen.

This is the network of the standard FID checkpoint ``pt_inception-2015-12-05-6726825d.pth`` that
pytorch-fid uses: TensorFlow's 2015-12-05 Inception-V3 graph (the one of the original TTUR FID code),
expressed as torchvision's ``Inception3`` topology with the FID-specific blocks that reproduce the TF
graph's quirks:

* ``Mixed_5b/5c/5d`` (FIDInceptionA), ``Mixed_6b..6e`` (FIDInceptionC) and ``Mixed_7b`` (FIDInceptionE_1):
  the 3x3 stride-1 average pool of the pool branch ignores the zero padding (TF ``avg_pool`` semantics,
  PyTorch ``count_include_pad=False``);
* ``Mixed_7c`` (FIDInceptionE_2): the pool branch uses a 3x3 stride-1 **max** pool (padding 1);
* ``Mixed_6a`` (InceptionB) and ``Mixed_7a`` (InceptionD) are torchvision's blocks unchanged.

Every convolution is a ``BasicConv``: a bias-free convolution, BatchNorm with ``eps = 1e-3`` in
inference mode (running statistics; ``y = (x - mean) / sqrt(var + eps) * scale + bias``) and a ReLU.
The network ends with the global average pool over the 8x8 map of ``Mixed_7c``: the 2048-d "pool3"
features of FID. The classifier (``fc``, 1008 classes) is not built: FID never uses it.

Layout and conventions
----------------------
* Input: ``(N, H, W, 3)`` float32 NHWC RGB in **[-1, 1]** (the range the FID net was trained with;
  pytorch-fid maps its [0, 1] images with ``2 * x - 1``, and so does
  :class:`sketchcomp_jax.eval.fid.InceptionFeatures`). FID uses ``H = W = 299``; the network is fully
  convolutional and accepts any ``H, W >= 75``, but features at another size are not the FID features.
* Output: ``(N, 2048)`` float32 pool3 features (non-negative: the mean of ReLU outputs).
* Down-sampling convolutions/pools use ``VALID`` padding (PyTorch floor mode).
* Variables: ``{'params': ..., 'batch_stats': ...}``. The module tree mirrors the PyTorch names one to
  one (``Conv2d_1a_3x3/conv/kernel`` (HWIO), ``Conv2d_1a_3x3/bn/{scale,bias}`` in ``params`` and
  ``Conv2d_1a_3x3/bn/{mean,var}`` in ``batch_stats``; likewise ``Mixed_5b/branch1x1/...``), so the
  checkpoint key map of :mod:`sketchcomp_jax.weights.inception_weights` is mechanical.

``precision`` is passed to every convolution; the default ``HIGHEST`` keeps float32 accuracy on GPUs
and TPUs (no TF32 / bf16 passes), which FID needs: its covariance terms amplify feature errors.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "FID_FEATURE_DIM",
    "FID_INPUT_SIZE",
    "INCEPTION_BN_EPS",
    "BasicConv",
    "FIDInceptionV3",
    "InceptionA",
    "InceptionB",
    "InceptionC",
    "InceptionD",
    "InceptionE",
]

FID_INPUT_SIZE = 299
FID_FEATURE_DIM = 2048
INCEPTION_BN_EPS = 1e-3

_HIGHEST = jax.lax.Precision.HIGHEST


class BasicConv(nn.Module):
    """Bias-free convolution -> inference BatchNorm (eps 1e-3) -> ReLU (torchvision's ``BasicConv2d``).

    ``kernel``, ``strides`` and ``padding`` are ``(height, width)`` pairs; ``padding`` is symmetric, in
    pixels, like PyTorch's ``padding=(ph, pw)``.
    """

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=self.strides,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=INCEPTION_BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's avg_pool averages over the valid taps only; count_include_pad=True would darken the border.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    # reduce_window pads with -inf, like PyTorch's max_pool2d(padding=1).
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """35x35 block (``Mixed_5b/5c/5d``, FIDInceptionA): 64 + 64 + 96 + ``pool_features`` channels."""

    pool_features: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), (2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), (1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (``Mixed_6a``): 384 + 96 + ``C_in`` channels."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s=(1, 1), p=(0, 0), name=None: BasicConv(
            f, k, strides=s, padding=p, precision=self.precision, name=name
        )
        b3 = conv(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), p=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (``Mixed_6b..6e``, FIDInceptionC): 4 x 192 channels."""

    channels_7x7: int
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        c7 = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the 1x7 and 7x1 convs
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, *row, name="branch7x7_2")(b7)
        b7 = conv(192, *col, name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, *col, name="branch7x7dbl_2")(bd)
        bd = conv(c7, *row, name="branch7x7dbl_3")(bd)
        bd = conv(c7, *col, name="branch7x7dbl_4")(bd)
        bd = conv(192, *row, name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (``Mixed_7a``): 320 + 192 + ``C_in`` channels."""

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = lambda f, k, s=(1, 1), p=(0, 0), name=None: BasicConv(
            f, k, strides=s, padding=p, precision=self.precision, name=name
        )
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), p=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), p=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 convolutions: 320 + 768 + 768 + 192 = 2048 channels.

    ``pool = 'avg'`` is FIDInceptionE_1 (``Mixed_7b``: average pool without the padding), ``'max'`` is
    FIDInceptionE_2 (``Mixed_7c``: the TF graph max-pools here).
    """

    pool: str = "avg"
    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        conv = lambda f, k, p=(0, 0), name=None: BasicConv(f, k, padding=p, precision=self.precision, name=name)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), (0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), (1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), (1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), (0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), (1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-V3 up to pool3.

    ``__call__(x)``: ``x`` ``(N, H, W, 3)`` float32 in [-1, 1] (``H = W = 299`` for FID) ->
    ``(N, 2048)`` float32 pool3 features. Apply with ``{'params': ..., 'batch_stats': ...}``; the module
    has no training mode (BatchNorm always uses its running statistics).
    """

    precision: Any = _HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (N, H, W, 3) NHWC RGB images, got shape {x.shape}")
        if min(x.shape[1:3]) < 75:
            raise ValueError(f"FIDInceptionV3 needs images of at least 75x75 (FID uses 299x299), got {x.shape[1:3]}")
        p = self.precision
        x = BasicConv(32, (3, 3), strides=(2, 2), precision=p, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), precision=p, name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), precision=p, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), precision=p, name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), precision=p, name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c7, precision=p, name=name)(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))

"""The one bilinear resize: PyTorch's `F.interpolate(mode="bilinear", align_corners=False, antialias=False)`.

This is what the original computes wherever it resizes a tensor: torchvision 0.12's tensor `T.Resize`
(dataset crops, the 64×64 mask and sketch), PiDiNet's side-output up-sampling, for any input and output
size, up or down, integer factor or not. No antialiasing: down-sampling by k reads only the two source
pixels nearest each output centre per axis (the 2×2 centre of each 8×8 block for 512→64), so thin lines
elsewhere vanish, as in the original. `jax.image.resize` antialiases when down-sampling: never use it here.

One set of coefficients (`bilinear_axis`), three appliers with the same arithmetic as PyTorch's CPU
kernel (width first, then height; `w0·a + w1·b` per axis):
  * `resize_bilinear`     — JAX, NHWC (models, diffusion inputs);
  * `resize_bilinear_np`  — numpy float (h, w, c) (host-side data code);
  * `resize_u8_bilinear`  — numpy uint8 (h, w, c) through a lookup table (ToTensor/Normalize) without
                            converting the whole image (data pipeline crops).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def bilinear_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices `i0, i1` (int64) and float32 weights `w0, w1` of PyTorch's linear interpolation along
    one axis: `src = max(scale·(dst + 0.5) − 0.5, 0)` with `scale = float32(in) / out`, the multiply-subtract
    fused (one rounding) as PyTorch's CPU kernel computes it (a separately rounded product differs by one
    float32 ulp of `src` for sizes like 421 → 333); `i0 = min(floor(src), in − 1)`, `i1 = min(i0 + 1, in − 1)`,
    `w1 = src − i0`, `w0 = 1 − w1`. The arrays are cached: treat them as read-only."""
    if in_size <= 0 or out_size <= 0:
        raise ValueError(f"resize sizes must be positive, got {in_size} → {out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    x = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = np.maximum((x.astype(np.float64) * np.float64(scale) - 0.5).astype(np.float32), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return i0, i1, w0, w1


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """NHWC `x` → (N, height, width, C), PyTorch bilinear (align_corners=False, no antialias). An axis whose
    size does not change is passed through exactly (PyTorch's weights are then 1 and 0)."""
    def along(values: jax.Array, axis: int, out_size: int) -> jax.Array:
        if values.shape[axis] == out_size:
            return values
        i0, i1, w0, w1 = bilinear_axis(values.shape[axis], out_size)
        shape = [1] * values.ndim
        shape[axis] = out_size
        w0 = jnp.asarray(w0, values.dtype).reshape(shape)
        w1 = jnp.asarray(w1, values.dtype).reshape(shape)
        return jnp.take(values, jnp.asarray(i0, jnp.int32), axis=axis) * w0 + jnp.take(
            values, jnp.asarray(i1, jnp.int32), axis=axis) * w1

    return along(along(x, 2, width), 1, height)


def resize_bilinear_np(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float (h, w, c) → float32 (height, width, c), the same resize as `resize_bilinear`."""
    x = np.asarray(x, np.float32)
    h, w = x.shape[:2]
    if w != width:
        j0, j1, ww0, ww1 = bilinear_axis(w, width)
        x = x.take(j0, axis=1) * ww0[None, :, None] + x.take(j1, axis=1) * ww1[None, :, None]
    if h != height:
        i0, i1, hw0, hw1 = bilinear_axis(h, height)
        x = x.take(i0, axis=0) * hw0[:, None, None] + x.take(i1, axis=0) * hw1[:, None, None]
    return x.astype(np.float32)


def resize_u8_bilinear(x: np.ndarray, height: int, width: int, lut: np.ndarray) -> np.ndarray:
    """The resize of the float32 tensor `lut[x]` for a uint8 (h, w, c) array, without converting the whole
    input: only the ≤ 2 source rows/columns each output pixel reads are gathered and mapped through `lut`
    (e.g. ToTensor + Normalize). Returns float32 (height, width, c)."""
    h, w = x.shape[:2]
    if (h, w) == (height, width):
        return lut[x]
    i0, i1, hw0, hw1 = bilinear_axis(h, height)
    if w == width:
        top, bottom = lut[x.take(i0, axis=0)], lut[x.take(i1, axis=0)]
    else:
        j0, j1, ww0, ww1 = bilinear_axis(w, width)
        ww0 = ww0[None, :, None]
        ww1 = ww1[None, :, None]
        r0 = x.take(i0, axis=0)
        r1 = x.take(i1, axis=0)
        top = lut[r0.take(j0, axis=1)] * ww0
        top += lut[r0.take(j1, axis=1)] * ww1
        bottom = lut[r1.take(j0, axis=1)] * ww0
        bottom += lut[r1.take(j1, axis=1)] * ww1
    if h == height:
        return top
    top *= hw0[:, None, None]
    bottom *= hw1[:, None, None]
    top += bottom
    return top

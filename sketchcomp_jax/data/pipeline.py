"""The training / evaluation input pipeline: records → Paint-by-Sketch samples → sharded global batches.

grain: ``RecordSource`` (the prepared TFDS/ArrayRecord split, :mod:`sketchcomp_jax.data.records`) →
``IndexSampler`` (seeded global shuffle, per-process shard, epochs) → sample construction
(:class:`TrainSample`, a ``grain.transforms.RandomMap``, or :class:`EvalSample` with per-index fixed
randomness) → ``Batch`` → :func:`to_global_batch` (``jax.make_array_from_process_local_data``).

Sample construction follows the original (``ldm/data/danbooru.py`` of Paint-by-Sketch, the same as
Paint-by-Example's ``open-images.py``; SPEC §2.3, §3.5-3.6) step by step; see :func:`make_sample` and
docs/data_pipeline.md. Everything here is numpy / scipy / PIL: the OpenCV operations of the original's
albumentations 0.4.3 reference augmentation (``Resize``, ``Rotate``, ``Blur``, ``ElasticTransform``) are
re-implemented with OpenCV's own fixed-point arithmetic (1/32-pixel coordinates, integer weights) so
that, given the same parameters, they reproduce ``cv2`` pixel for pixel (checked against
opencv-python 4.10 when it is installed: ``tests/test_data_pipeline.py``).

Batch (per process): ``gt`` (B,R,R,3) in [-1, 1]; ``keep_mask`` (B,R,R,1), 1 = keep, fractional on
resized edges as in the original; ``sketch`` (B,R,R,3) in [-1, 1], the full sketch (white = +1);
``reference`` (B,S,S,3) CLIP-normalised; ``tags`` (list of str, Danbooru spaces → commas as the
original) when the dataset has tags. All float32, NHWC.

This module imports no JAX at import time (grain worker processes import it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image, ImageDraw

from sketchcomp_jax.data import records
from sketchcomp_jax.ops.resize import resize_bilinear_np, resize_u8_bilinear  # noqa: F401  (T.Resize; re-exported)

# The original's constants.
REFERENCE_PAD = 10  # px added around the RoI for the reference crop (clipped to the image)
EXTEND_FRACTION = 0.4  # the extended box pushes each side by randint(0, int(0.4 · free space))
BEZIER_JITTER = 5  # randint(-5, 5) added to every Bézier point
CROP_FREE_FRACTION = 0.6  # the square crop trims randint(0, int(0.6 · free)) on every side
ROTATE_LIMIT = 20.0
P_FLIP, P_ROTATE, P_BLUR, P_ELASTIC = 0.5, 0.5, 0.3, 0.3
BLUR_KSIZES = (3, 5, 7)
ELASTIC_ALPHA, ELASTIC_SIGMA, ELASTIC_ALPHA_AFFINE = 1.0, 50.0, 50.0
EVAL_SEED_SALT = 77  # the original re-seeds with index·77 in validation; we seed with (seed, 77, index)

# CLIP's normalisation (sketchcomp_jax.models.clip_vision.CLIP_MEAN / CLIP_STD; repeated here so that
# grain workers need not import flax; a test checks they are equal).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _randint(rng: np.random.Generator, a: int, b: int) -> int:
    """Python's ``random.randint(a, b)``: both ends included."""
    return int(rng.integers(a, b + 1))


# --------------------------------------------------------------------------------------------------
# Look-up tables: torchvision's ToTensor + Normalize in float32, exactly
# --------------------------------------------------------------------------------------------------


def _lut(mean: float, std: float) -> np.ndarray:
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    return ((v - np.float32(mean)) / np.float32(std)).astype(np.float32)


LUT_UNIT = _lut(0.5, 0.5)  # uint8 → [-1, 1]: get_tensor() = ToTensor + Normalize(0.5, 0.5)
LUT_IDENTITY = np.arange(256, dtype=np.float32)
LUT_CLIP = np.stack([_lut(m, s) for m, s in zip(CLIP_MEAN, CLIP_STD)], axis=0)  # (3, 256)


def clip_normalize(reference_u8: np.ndarray) -> np.ndarray:
    """uint8 (S,S,3) → float32 CLIP-normalised ``(x/255 − mean)/std`` (torchvision's float32 values)."""
    return np.stack([LUT_CLIP[c][reference_u8[..., c]] for c in range(3)], axis=-1)


# --------------------------------------------------------------------------------------------------
# RoI, extended box, masks, square crop (SPEC §3.5 steps 3-5, §3.6)
# --------------------------------------------------------------------------------------------------


def random_bbox(size: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """PbS ``random_bbox(img.size)``: ``size = (randint(0, W), randint(0, H))``, a centre
    ``(randint(sw//2, W − sw//2), randint(sh//2, H − sh//2))``, box ``[cx − sw//2, cy − sh//2, cx + sw//2,
    cy + sh//2]`` (x0, y0, x1, y1; either side may be 0)."""
    w, h = size
    sw, sh = _randint(rng, 0, w), _randint(rng, 0, h)
    cx, cy = _randint(rng, sw // 2, w - sw // 2), _randint(rng, sh // 2, h - sh // 2)
    return [cx - sw // 2, cy - sh // 2, cx + sw // 2, cy + sh // 2]


def pad_bbox(bbox: Sequence[int], size: tuple[int, int], pad: int = REFERENCE_PAD) -> list[int]:
    """The reference crop box: each side pushed out by ``min(pad, free space)``."""
    w, h = size
    x0, y0, x1, y1 = bbox
    return [x0 - min(pad, max(x0, 0)), y0 - min(pad, max(y0, 0)), x1 + min(pad, max(w - x1, 0)),
            y1 + min(pad, max(h - y1, 0))]


def extend_bbox(bbox: Sequence[int], size: tuple[int, int], rng: np.random.Generator) -> list[int]:
    """Each side pushed out by ``randint(0, int(0.4 · free space))``, in the order left, up, right, down."""
    w, h = size
    x0, y0, x1, y1 = bbox
    left = x0 - _randint(rng, 0, int(EXTEND_FRACTION * max(x0, 0)))
    up = y0 - _randint(rng, 0, int(EXTEND_FRACTION * max(y0, 0)))
    right = x1 + _randint(rng, 0, int(EXTEND_FRACTION * max(w - x1, 0)))
    down = y1 + _randint(rng, 0, int(EXTEND_FRACTION * max(h - y1, 0)))
    return [left, up, right, down]


def bezier_evaluate(nodes: Sequence[tuple[float, float]], s: float) -> tuple[float, float]:
    """A quadratic Bézier point, with the floating-point operations of ``bezier.Curve.evaluate`` (the
    ``bezier`` package's ``evaluate_multi_barycentric``: ``((λ1·P0 + (2·λ2)·P1)·λ1) + λ2²·P2``,
    ``λ1 = 1 − s``), so that the original's exact-equality de-duplication behaves identically."""
    l1 = 1.0 - s
    l2 = s
    out = []
    for d in range(2):
        r = l1 * nodes[0][d]
        r = r + (2.0 * l2) * nodes[1][d]
        r = r * l1
        r = r + (l2 * l2) * nodes[2][d]
        out.append(r)
    return out[0], out[1]


def bezier_polygon(bbox: Sequence[int], ext: Sequence[int], rng: np.random.Generator,
                   jitter: int = BEZIER_JITTER) -> list[tuple[float, float]]:
    """The original's "arbitrary mask" outline: four quadratic Bézier curves between the RoI corners
    (top, right, bottom, left), each bulging to the extended box through its control point. Each curve
    is evaluated at ``s = 0.05·i, i = 1..18``; a point is kept only if neither its exact x nor its exact
    y was already kept on that curve (so, e.g., the mirror half of a symmetric side is often dropped,
    exactly as in the original), then moved by ``randint(−5, 5)`` in x and y."""
    x0, y0, x1, y1 = bbox
    ex0, ey0, ex1, ey1 = ext
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    curves = [
        [(x0, y0), (mx, ey0), (x1, y0)],  # top
        [(x1, y0), (ex1, my), (x1, y1)],  # right
        [(x1, y1), (mx, ey1), (x0, y1)],  # bottom
        [(x0, y1), (ex0, my), (x0, y0)],  # left
    ]
    points: list[tuple[float, float]] = []
    for nodes in curves:
        nodes = [(float(a), float(b)) for a, b in nodes]
        xs: list[float] = []
        ys: list[float] = []
        for i in range(1, 19):
            x, y = bezier_evaluate(nodes, i * 0.05)
            if x not in xs and y not in ys:
                dx = _randint(rng, -jitter, jitter)
                dy = _randint(rng, -jitter, jitter)
                points.append((x + dx, y + dy))
                xs.append(x)
                ys.append(y)
    return points


def polygon_keep_mask(points: Sequence[tuple[float, float]], size: tuple[int, int]) -> np.ndarray:
    """PIL ``ImageDraw.polygon(points, fill=black)`` on a white canvas → uint8 (H, W), 1 = keep, 0 = hole."""
    canvas = Image.new("L", size, 255)
    ImageDraw.Draw(canvas).polygon(list(points), fill=0)
    return (np.asarray(canvas) // 255).astype(np.uint8)


def rectangle_keep_mask(ext: Sequence[int], size: tuple[int, int]) -> np.ndarray:
    """``1 − rect``: 0 on ``[ey0:ey1, ex0:ex1]`` (numpy slicing, exclusive ends), 1 elsewhere. uint8 (H, W)."""
    w, h = size
    mask = np.ones((h, w), np.uint8)
    ex0, ey0, ex1, ey1 = ext
    mask[max(ey0, 0):max(ey1, 0), max(ex0, 0):max(ex1, 0)] = 0
    return mask


def square_crop_window(size: tuple[int, int], ext: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """The zoomed square crop ``(top, bottom, left, right)`` (exclusive ends) around the extended box.

    W > H: ``left ∈ [max(0, ex1 − H), min(W, ex0 + H) − H]``; if that range is empty or a single value
    the image is not cropped (and later stretched to a square, as the original). Otherwise
    ``free = min(ey0, ex0 − left, left + H − ex1, H − ey1)``, ``r = randint(0, int(0.6·free))`` and the
    crop is ``[r : H−r, left+r : left+H−r]``. H > W is symmetric; W == H is never cropped.
    """
    w, h = size
    ex0, ey0, ex1, ey1 = ext
    if w > h:
        left_most = max(ex1 - h, 0)
        right_most = min(ex0 + h, w) - h
        if right_most <= left_most:
            return 0, h, 0, w
        left = _randint(rng, left_most, right_most)
        free = min(ey0, ex0 - left, left + h - ex1, h - ey1)
        r = _randint(rng, 0, int(CROP_FREE_FRACTION * free))
        return r, h - r, left + r, left + h - r
    if w < h:
        upper_most = max(ey1 - w, 0)
        lower_most = min(ey0 + w, h) - w
        if lower_most <= upper_most:
            return 0, h, 0, w
        upper = _randint(rng, upper_most, lower_most)
        free = min(ey0 - upper, ex0, w - ex1, upper + w - ey1)
        r = _randint(rng, 0, int(CROP_FREE_FRACTION * free))
        return upper + r, upper + w - r, r, w - r
    return 0, h, 0, w


# --------------------------------------------------------------------------------------------------
# OpenCV-exact uint8 operations (albumentations 0.4.3's Resize / HorizontalFlip / Rotate / Blur / Elastic)
# --------------------------------------------------------------------------------------------------

_INTER_BITS = 5  # OpenCV: coordinates in 1/32 pixel
_INTER_TAB = 1 << _INTER_BITS
_AB_BITS = 10
_RESIZE_COEF = 2048  # INTER_RESIZE_COEF_SCALE (11 bits)


def _reflect101(i: np.ndarray, n: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 (``gfedcb|abcdefgh|gfedcba``) for any integer indices."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    i = np.abs(i) % period
    return np.where(i >= n, period - i, i)


@functools.lru_cache(maxsize=64)
def _cv2_resize_axis(src: int, dst: int, horizontal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``cv::resize`` INTER_LINEAR coefficients along one axis: indices and 11-bit integer weights.
    Horizontally OpenCV zeroes the weight of out-of-range neighbours; vertically it keeps the weights
    and reads the clamped row twice (which rounds differently in the fixed-point vertical pass)."""
    scale = 1.0 / (float(dst) / float(src))
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if horizontal:
        low = s < 0
        high = s >= src - 1
        f[low | high] = 0
        s[low] = 0
        s[high] = src - 1
    a1 = np.rint(f * np.float32(_RESIZE_COEF)).astype(np.int32)
    a0 = np.rint((np.float32(1) - f) * np.float32(_RESIZE_COEF)).astype(np.int32)
    return np.clip(s, 0, src - 1), np.clip(s + 1, 0, src - 1), a0, a1


def cv2_resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation=INTER_LINEAR)`` for uint8 (h, w, c): half-pixel
    centres, no antialias, 11-bit fixed-point weights and OpenCV's SIMD rounding of the vertical pass."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img
    xs0, xs1, a0, a1 = _cv2_resize_axis(w, width, True)
    ys0, ys1, b0, b1 = _cv2_resize_axis(h, height, False)
    rows = np.unique(np.concatenate([ys0, ys1]))
    sub = img[rows].astype(np.int32)
    shape = (1, width) + (1,) * (img.ndim - 2)
    horiz = sub[:, xs0] * a0.reshape(shape) + sub[:, xs1] * a1.reshape(shape)  # only the rows read
    bshape = (height,) + (1,) * (img.ndim - 1)
    t0 = ((horiz[np.searchsorted(rows, ys0)] >> 4) * b0.reshape(bshape)) >> 16
    t1 = ((horiz[np.searchsorted(rows, ys1)] >> 4) * b1.reshape(bshape)) >> 16
    return np.clip((t0 + t1 + 2) >> 2, 0, 255).astype(np.uint8)


def _remap_bilinear_fixed(img: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """OpenCV's bilinear ``remap`` of uint8 (h, w, c) at fixed-point coordinates ``X, Y`` (in 1/32 px),
    BORDER_REFLECT_101 for every tap; weights ``(32−fx)(32−fy)/1024 …`` and round-half-up."""
    h, w = img.shape[:2]
    c = img.shape[2] if img.ndim == 3 else 1
    sx, fx = X >> _INTER_BITS, (X & (_INTER_TAB - 1)).astype(np.int32)
    sy, fy = Y >> _INTER_BITS, (Y & (_INTER_TAB - 1)).astype(np.int32)
    x0, x1, y0, y1 = sx, sx + 1, sy, sy + 1
    if sx.min() < 0 or sx.max() >= w - 1:
        x0, x1 = _reflect101(x0, w), _reflect101(x1, w)
    if sy.min() < 0 or sy.max() >= h - 1:
        y0, y1 = _reflect101(y0, h), _reflect101(y1, h)
    flat = img.reshape(h * w, c).astype(np.int32)
    r0, r1 = (y0 * w).ravel(), (y1 * w).ravel()
    x0, x1 = x0.ravel(), x1.ravel()
    wx1 = fx.reshape(-1, 1)
    wx0 = _INTER_TAB - wx1
    wy1 = fy.reshape(-1, 1)
    wy0 = _INTER_TAB - wy1
    top = flat.take(r0 + x0, axis=0) * wx0
    top += flat.take(r0 + x1, axis=0) * wx1
    bottom = flat.take(r1 + x0, axis=0) * wx0
    bottom += flat.take(r1 + x1, axis=0) * wx1
    acc = top * wy0
    acc += bottom * wy1
    acc += 1 << (2 * _INTER_BITS - 1)
    acc >>= 2 * _INTER_BITS
    return np.clip(acc, 0, 255).astype(np.uint8).reshape(X.shape + img.shape[2:])


def cv2_warp_affine(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``cv2.warpAffine(img, M, (w, h), flags=INTER_LINEAR, borderMode=BORDER_REFLECT_101)`` for uint8
    (h, w, c): M (src → dst) is inverted as OpenCV does, destination coordinates are mapped in 10-bit fixed
    point and rounded to 1/32 px, then bilinear remap (:func:`_remap_bilinear_fixed`)."""
    h, w = img.shape[:2]
    m = np.asarray(matrix, np.float64).reshape(6).copy()
    d = m[0] * m[4] - m[1] * m[3]
    d = 1.0 / d if d != 0 else 0.0
    a11, a22 = m[4] * d, m[0] * d
    m[0], m[1], m[3], m[4] = a11, m[1] * -d, m[3] * -d, a22
    b1 = -m[0] * m[2] - m[1] * m[5]
    b2 = -m[3] * m[2] - m[4] * m[5]
    m[2], m[5] = b1, b2
    scale = float(1 << _AB_BITS)
    xs = np.arange(w, dtype=np.float64)
    ys = np.arange(h, dtype=np.float64)
    adelta = np.rint(m[0] * xs * scale).astype(np.int64)
    bdelta = np.rint(m[3] * xs * scale).astype(np.int64)
    round_delta = (1 << _AB_BITS) // _INTER_TAB // 2
    x0 = np.rint((m[1] * ys + m[2]) * scale).astype(np.int64) + round_delta
    y0 = np.rint((m[4] * ys + m[5]) * scale).astype(np.int64) + round_delta
    shift = _AB_BITS - _INTER_BITS
    X = (x0[:, None] + adelta[None, :]) >> shift
    Y = (y0[:, None] + bdelta[None, :]) >> shift
    return _remap_bilinear_fixed(img, X, Y)


def cv2_remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """``cv2.remap(img, map_x, map_y, INTER_LINEAR, borderMode=BORDER_REFLECT_101)`` with float32 maps."""
    X = np.rint(np.asarray(map_x, np.float32) * np.float32(_INTER_TAB)).astype(np.int64)
    Y = np.rint(np.asarray(map_y, np.float32) * np.float32(_INTER_TAB)).astype(np.int64)
    return _remap_bilinear_fixed(img, X, Y)


def cv2_rotation_matrix(center: tuple[float, float], angle: float, scale: float = 1.0) -> np.ndarray:
    """``cv2.getRotationMatrix2D``: counter-clockwise by ``angle`` degrees about ``center`` (x, y)."""
    cx, cy = float(np.float32(center[0])), float(np.float32(center[1]))
    a = math.radians(angle)
    alpha, beta = math.cos(a) * scale, math.sin(a) * scale
    return np.array([[alpha, beta, (1 - alpha) * cx - beta * cy],
                     [-beta, alpha, beta * cx + (1 - alpha) * cy]], np.float64)


def cv2_affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """``cv2.getAffineTransform``: the 2×3 matrix mapping three points ``src`` → ``dst`` (6×6 solve)."""
    a = np.zeros((6, 6), np.float64)
    b = np.zeros(6, np.float64)
    for i in range(3):
        x, y = float(src[i][0]), float(src[i][1])
        a[2 * i, 0:3] = (x, y, 1.0)
        a[2 * i + 1, 3:6] = (x, y, 1.0)
        b[2 * i], b[2 * i + 1] = float(dst[i][0]), float(dst[i][1])
    return np.linalg.solve(a, b).reshape(2, 3)


def cv2_box_blur(img: np.ndarray, ksize: int) -> np.ndarray:
    """``cv2.blur(img, (k, k))`` for uint8: normalised box filter, BORDER_REFLECT_101, rounded."""
    r = ksize // 2
    pad = [(r, r), (r, r)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img.astype(np.int64), pad, mode="reflect")  # numpy "reflect" == OpenCV REFLECT_101
    c = np.cumsum(np.cumsum(p, axis=0), axis=1)
    c = np.pad(c, [(1, 0), (1, 0)] + [(0, 0)] * (img.ndim - 2))
    h, w = img.shape[:2]
    s = c[ksize:ksize + h, ksize:ksize + w] - c[:h, ksize:ksize + w] - c[ksize:ksize + h, :w] + c[:h, :w]
    return np.clip(np.rint(s * (1.0 / (ksize * ksize))), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _reflect_gaussian_fft(n: int, sigma: float) -> np.ndarray:
    """rFFT of scipy's Gaussian kernel (truncate 4) wrapped on the period 2n of the 'reflect' extension."""
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x.astype(np.float64) ** 2)
    phi /= phi.sum()
    kernel = np.zeros(2 * n, np.float64)
    np.add.at(kernel, x % (2 * n), phi)
    return np.fft.rfft(kernel)


def gaussian_filter_reflect(a: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(a, sigma)`` (mode 'reflect', truncate 4) for a 2-D float64 array,
    computed as a circular convolution of the period-2n mirror extension (what 'reflect' is) with FFTs:
    equal to scipy's to ~1e-17, and ~50× faster at sigma 50 (no BLAS, so no thread contention)."""
    out = np.asarray(a, np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        ext = np.concatenate([out, np.flip(out, axis=axis)], axis=axis)
        spec = np.fft.rfft(ext, axis=axis)
        k = _reflect_gaussian_fft(n, float(sigma))
        spec *= k.reshape((-1, 1) if axis == 0 else (1, -1))
        out = np.fft.irfft(spec, n=2 * n, axis=axis).take(np.arange(n), axis=axis)
    return out


def elastic_transform(img: np.ndarray, random_state: int, alpha: float = ELASTIC_ALPHA, sigma: float = ELASTIC_SIGMA,
                      alpha_affine: float = ELASTIC_ALPHA_AFFINE) -> np.ndarray:
    """albumentations 0.4.3 ``F.elastic_transform`` (``approximate=False``) with its
    ``np.random.RandomState(random_state)``: a random affine warp of three points by ±alpha_affine px,
    then a displacement field ``gaussian_filter(U(−1, 1), sigma)·alpha`` (:func:`gaussian_filter_reflect`)."""
    rs = np.random.RandomState(random_state)
    h, w = img.shape[:2]
    center = np.float32((h, w)) // 2
    square = min((h, w)) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    pts2 = pts1 + rs.uniform(-alpha_affine, alpha_affine, size=pts1.shape).astype(np.float32)
    img = cv2_warp_affine(img, cv2_affine_from_points(pts1, pts2))
    dx = np.float32(gaussian_filter_reflect(rs.rand(h, w) * 2 - 1, sigma) * alpha)
    dy = np.float32(gaussian_filter_reflect(rs.rand(h, w) * 2 - 1, sigma) * alpha)
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    map_x = np.float32(x + dx)
    map_y = np.float32(y + dy)
    X = np.rint(map_x * np.float32(_INTER_TAB)).astype(np.int64)
    Y = np.rint(map_y * np.float32(_INTER_TAB)).astype(np.int64)
    if np.array_equal(X, x * _INTER_TAB) and np.array_equal(Y, y * _INTER_TAB):
        return img  # the displacement rounds to zero everywhere (the usual case at sigma 50): remap is the identity
    return _remap_bilinear_fixed(img, X, Y)


@dataclasses.dataclass
class ReferenceAugmentation:
    """The parameters one albumentations ``Compose`` call draws (None = transform not applied)."""

    flip: bool = False
    angle: float | None = None
    blur_ksize: int | None = None
    elastic_state: int | None = None

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "ReferenceAugmentation":
        """In Compose order: Resize (p=1, no parameters), HorizontalFlip p=0.5, Rotate p=0.5
        (angle ~ U(−20, 20)), Blur p=0.3 (ksize ∈ {3,5,7}), ElasticTransform p=0.3 (random_state ∈
        [0, 10000], as albumentations)."""
        aug = cls()
        aug.flip = bool(rng.random() < P_FLIP)
        if rng.random() < P_ROTATE:
            aug.angle = float(rng.uniform(-ROTATE_LIMIT, ROTATE_LIMIT))
        if rng.random() < P_BLUR:
            aug.blur_ksize = int(BLUR_KSIZES[int(rng.integers(len(BLUR_KSIZES)))])
        if rng.random() < P_ELASTIC:
            aug.elastic_state = _randint(rng, 0, 10000)
        return aug


def augment_reference(crop: np.ndarray, size: int, aug: ReferenceAugmentation | None) -> np.ndarray:
    """uint8 RoI crop → uint8 (size, size, 3): ``Resize(size, size)`` then (if ``aug``) flip, rotate,
    blur, elastic — each an OpenCV-exact uint8 operation, as albumentations applies them."""
    out = cv2_resize_linear(crop, size, size)
    if aug is None:
        return out
    if aug.flip:
        out = np.ascontiguousarray(out[:, ::-1])
    if aug.angle is not None:
        h, w = out.shape[:2]
        out = cv2_warp_affine(out, cv2_rotation_matrix((w / 2, h / 2), aug.angle))
    if aug.blur_ksize is not None:
        out = cv2_box_blur(out, aug.blur_ksize)
    if aug.elastic_state is not None:
        out = elastic_transform(out, aug.elastic_state)
    return out


# --------------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleBoxes:
    """The geometry drawn for one sample (for tests and debugging)."""

    bbox: list[int]
    reference_box: list[int]
    extended_bbox: list[int]
    bezier: bool
    crop: tuple[int, int, int, int]  # top, bottom, left, right
    augmentation: ReferenceAugmentation | None


def make_sample(
    image: np.ndarray,
    sketch: np.ndarray,
    rng: np.random.Generator,
    *,
    resolution: int,
    reference_size: int,
    augment: bool = True,
    arbitrary_mask_percent: float = 0.5,
    return_boxes: bool = False,
) -> dict[str, Any]:
    """One training sample from a uint8 RGB image (H, W, 3) and its uint8 sketch (H, W) (255 = line).

    The original's order (SPEC §3.5-3.6): random RoI ``bbox``; reference = the RoI padded by
    min(10, free) px, then (``augment``) the albumentations chain, else only the resize; extended box;
    with probability ``arbitrary_mask_percent`` the Bézier mask, else the extended rectangle; the zoomed
    square crop; image, mask and sketch resized to ``resolution`` with no-antialias bilinear.
    """
    h, w = image.shape[:2]
    if sketch.shape[:2] != (h, w):  # prepared datasets never do this; other sources might
        sketch = np.asarray(Image.fromarray(sketch).resize((w, h), Image.NEAREST))
    size = (w, h)
    bbox = random_bbox(size, rng)

    ref_box = pad_bbox(bbox, size)
    crop_ref = image[ref_box[1]:ref_box[3], ref_box[0]:ref_box[2]]
    aug = ReferenceAugmentation.draw(rng) if augment else None
    reference = clip_normalize(augment_reference(crop_ref, reference_size, aug))

    ext = extend_bbox(bbox, size, rng)
    bezier = bool(rng.random() < arbitrary_mask_percent)
    if bezier:
        keep = polygon_keep_mask(bezier_polygon(bbox, ext, rng), size)
    else:
        keep = rectangle_keep_mask(ext, size)

    top, bottom, left, right = square_crop_window(size, ext, rng)
    gt = resize_u8_bilinear(image[top:bottom, left:right], resolution, resolution, LUT_UNIT)
    keep_r = resize_u8_bilinear(keep[top:bottom, left:right, None], resolution, resolution, LUT_IDENTITY)
    sk = resize_u8_bilinear(sketch[top:bottom, left:right, None], resolution, resolution, LUT_UNIT)
    out: dict[str, Any] = {
        "gt": gt,
        "keep_mask": keep_r,
        "sketch": np.repeat(sk, 3, axis=-1),
        "reference": reference,
    }
    if return_boxes:
        out["boxes"] = SampleBoxes(bbox, ref_box, ext, bezier, (top, bottom, left, right), aug)
    return out


# --------------------------------------------------------------------------------------------------
# grain: source, transforms, batching, loader
# --------------------------------------------------------------------------------------------------


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray):
        v = v.item()
        return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
    return str(v)


_OPEN_LOCK = threading.Lock()


class RecordSource:
    """A grain random-access source over one split of a prepared dataset. Elements are dicts with the
    encoded ``image`` and ``sketch`` bytes, ``tags`` and ``id`` text and the record ``index``. Picklable
    (worker processes re-open the files); its ``repr`` (checked by grain when restoring an iterator)
    names the split and the dataset's content, not its path, so a moved dataset still restores."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        from sketchcomp_jax.paths import as_path

        info_path = as_path(self.data_dir) / "dataset_info.json"  # local or gs:// (records are read locally)
        if not info_path.is_file():
            records.load_builder(self.data_dir)  # raises the helpful error
        info = json.loads(info_path.read_text())
        splits = {s["name"]: s for s in info.get("splits", [])}
        if split not in splits:
            raise ValueError(f"{self.data_dir} has no split {split!r}; it has {sorted(splits)}")
        self._lengths = [int(n) for n in splits[split]["shardLengths"]]
        self._num = sum(self._lengths)
        meta = records.dataset_metadata(self.data_dir)
        self.has_tags = bool(meta.get("has_tags", False))
        self.sketcher = meta.get("sketcher", "unknown")
        self._src = None

    def _open(self):
        if self._src is None:
            with _OPEN_LOCK:  # grain's read threads share the source: open the split once per process
                if self._src is None:
                    self._src = records.open_split(self.data_dir, self.split)
        return self._src

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self._open()[int(index)]
        return {"image": r["image"], "sketch": r["sketch"], "tags": r["tags"], "id": r["id"], "index": int(index)}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_src"] = None
        return state

    def __repr__(self) -> str:
        return (f"RecordSource(split={self.split!r}, num_records={self._num}, shards={len(self._lengths)}, "
                f"sketcher={self.sketcher!r})")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    resolution: int
    reference_size: int
    arbitrary_mask_percent: float = 0.5
    with_tags: bool = False
    with_ids: bool = False
    tokenizer_dir: str | None = None  # text baseline: tags → `tokens` (77,) int32 with this CLIP tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str):
    """One tokenizer per folder and process (grain workers load their own)."""
    from sketchcomp_jax.models.clip_tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(folder)


def _build(element: dict[str, Any], rng: np.random.Generator, opts: SampleOptions, augment: bool) -> dict[str, Any]:
    image = records.decode_image(element["image"])
    sketch = records.decode_sketch(element["sketch"])
    sample = make_sample(image, sketch, rng, resolution=opts.resolution, reference_size=opts.reference_size,
                         augment=augment, arbitrary_mask_percent=opts.arbitrary_mask_percent)
    if opts.with_tags or opts.tokenizer_dir:
        # The original reads the tag file and replaces spaces by commas (Danbooru tags use "_" inside tags).
        sample["tags"] = _text(element["tags"]).replace(" ", ",")
    if opts.tokenizer_dir:
        sample["tokens"] = _tokenizer(opts.tokenizer_dir)(sample["tags"])[0]
    if opts.with_ids:
        sample["id"] = _text(element["id"])
    return sample


class TrainSample(grain.transforms.RandomMap):
    """The training sample construction; grain hands it a per-element Philox generator derived from the
    loader seed and the element's position, so batches are identical for any ``worker_count``."""

    def __init__(self, opts: SampleOptions):
        self.opts = opts

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return _build(element, rng, self.opts, augment=True)


class EvalSample(grain.transforms.Map):
    """The validation sample: RoI, mask and crop from a generator seeded by ``(seed, 77, record index)``
    (the original re-seeds ``random`` with ``index·77``), so each record always gets the same mask; the
    reference is only resized (as the original's validation transform)."""

    def __init__(self, opts: SampleOptions, seed: int):
        self.opts = opts
        self.seed = int(seed)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, EVAL_SEED_SALT, int(element["index"])])
        return _build(element, rng, self.opts, augment=False)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks array fields; text fields (tags, id) become lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        else:
            out[key] = list(values)
    return out


class BatchAlignedSampler:
    """Wraps grain's ``IndexSampler`` so that batches do not depend on ``worker_count``.

    grain's ``DataLoader`` deals elements to its W workers round-robin (stream position ``l`` goes to
    worker ``l % W``), each worker batches its own elements, and batches are read from the workers in
    turn. This sampler reorders the stream so that worker ``w``'s ``k``-th batch holds exactly the
    elements of global batch ``k·W + w``, i.e. the batches (and their per-element random generators,
    which follow the element) come out identical to ``worker_count=0``. Finite streams are cut so that
    no worker forms a batch beyond the last one a single process would form (``drop_remainder``); with
    ``drop_remainder=False`` the final incomplete round keeps the plain order (only the last < W·B
    elements may then be grouped differently).
    """

    def __init__(self, inner: Any, *, shard_count: int, batch_size: int, worker_count: int, drop_remainder: bool):
        self.inner = inner
        self.shard_count = int(shard_count)
        self.batch_size = int(batch_size)
        self.workers = max(1, int(worker_count))
        self.drop_remainder = bool(drop_remainder)
        total = len(inner)
        self.infinite = total >= sys.maxsize // 2
        self._local_total = total // self.shard_count
        if self.infinite:
            self._local_len = self._local_total
        elif self.drop_remainder:
            nb = self._local_total // self.batch_size
            if nb == 0:
                self._local_len = 0
            else:
                last_round, last_worker = divmod(nb - 1, self.workers)
                self._local_len = ((last_round * self.batch_size + self.batch_size - 1) * self.workers
                                   + last_worker + 1)
        else:
            self._local_len = self._local_total
        round_size = self.workers * self.batch_size
        self._full_rounds_end = (self._local_total // round_size) * round_size

    def __len__(self) -> int:
        return sys.maxsize if self.infinite else self._local_len * self.shard_count

    def _position(self, local: int) -> int:
        if not self.infinite and not self.drop_remainder and local >= self._full_rounds_end:
            return local
        w, j = local % self.workers, local // self.workers
        k, offset = divmod(j, self.batch_size)
        position = (k * self.workers + w) * self.batch_size + offset
        if not self.infinite and position >= self._local_total:
            position %= max(self._local_total, 1)  # filler for a batch that will be dropped
        return position

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self):
            raise IndexError(f"sampler index {index} out of range [0, {len(self)})")
        local, shard = divmod(index, self.shard_count)
        return self.inner[self._position(local) * self.shard_count + shard]

    def __repr__(self) -> str:
        return (f"BatchAlignedSampler(batch_size={self.batch_size}, workers={self.workers}, "
                f"drop_remainder={self.drop_remainder}, inner={self.inner!r})")


def make_train_loader(
    data_dir: str,
    *,
    split: str = "train",
    resolution: int,
    reference_size: int,
    global_batch_size: int,
    seed: int = 0,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    eval_mode: bool = False,
    arbitrary_mask_percent: float = 0.5,
    drop_remainder: bool = True,
    with_ids: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
) -> grain.DataLoader:
    """A grain ``DataLoader`` of per-process batches of ``global_batch_size // shard_count`` samples.

    ``shard_index/shard_count`` default to ``jax.process_index()/jax.process_count()``; every shard gets a
    disjoint, equal-sized part of the split (the remainder is dropped). Training: seeded global shuffle
    (a new order every epoch), ``num_epochs=None`` repeats forever, random samples from grain's
    per-element generators. ``eval_mode``: no shuffle, one epoch unless ``num_epochs`` says otherwise,
    per-record fixed masks (:class:`EvalSample`); ``drop_remainder=False`` keeps a short last batch.
    Deterministic in ``seed`` for any ``worker_count``; iterators support ``get_state``/``set_state``
    and Orbax (:func:`checkpoint_save_args`). ``tokenizer_dir`` (the text baseline) adds ``tokens``: the
    record's tags through that CLIP tokenizer, (B, 77) int32.
    """
    if shard_index is None or shard_count is None:
        if (shard_index is None) != (shard_count is None):
            raise ValueError("give both shard_index and shard_count, or neither")
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the shard count {shard_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    per_process = global_batch_size // shard_count
    source = RecordSource(data_dir, split)
    if len(source) // shard_count < 1:
        raise ValueError(f"split {split!r} has {len(source)} records: too few for {shard_count} shards")
    if drop_remainder and len(source) // shard_count < per_process:
        raise ValueError(f"split {split!r} has {len(source)} records: fewer than one batch of {per_process} per shard")
    if tokenizer_dir is not None:
        if not source.has_tags:
            raise ValueError(f"{data_dir} has no tags (prepared without --tags): the text baseline needs them")
        _tokenizer(os.fspath(tokenizer_dir))  # fail early on a bad folder
    opts = SampleOptions(resolution=int(resolution), reference_size=int(reference_size),
                         arbitrary_mask_percent=float(arbitrary_mask_percent), with_tags=source.has_tags,
                         with_ids=with_ids, tokenizer_dir=None if tokenizer_dir is None else os.fspath(tokenizer_dir))
    shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    if eval_mode and num_epochs is None:
        num_epochs = 1
    sampler = BatchAlignedSampler(
        grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options, shuffle=not eval_mode,
                                    num_epochs=num_epochs, seed=seed),
        shard_count=shard_count, batch_size=per_process, worker_count=worker_count, drop_remainder=drop_remainder,
    )
    transform = EvalSample(opts, seed) if eval_mode else TrainSample(opts)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(per_process, drop_remainder=drop_remainder, batch_fn=collate)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(per_process * 2, 16)),
    )


def to_global_batch(batch: dict, sharding) -> dict:
    """Per-process numpy batch → global ``jax.Array``s laid out by ``sharding`` (a ``NamedSharding`` whose
    first axis splits the batch), via ``jax.make_array_from_process_local_data``. Text fields are dropped."""
    import jax

    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# --------------------------------------------------------------------------------------------------
# Iterator checkpointing
# --------------------------------------------------------------------------------------------------


def iterator_state(iterator: Any) -> str:
    """The JSON text of a grain ``DataLoaderIterator``'s position (store it anywhere)."""
    state = iterator.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state)


def restore_iterator_state(iterator: Any, state: str | bytes | dict) -> Any:
    """Moves ``iterator`` (from the same loader configuration) to a position saved by :func:`iterator_state`."""
    if isinstance(state, dict):
        state = json.dumps(state)
    if isinstance(state, str):
        state = state.encode()
    iterator.set_state(state)
    return iterator


def checkpoint_save_args(iterator: Any):
    """Orbax args saving the iterator inside a checkpoint, e.g.
    ``mgr.save(step, args=ocp.args.Composite(state=..., data=checkpoint_save_args(it)))``."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: Any):
    """Orbax args restoring into ``iterator`` (``mgr.restore(step, args=ocp.args.Composite(...,
    data=checkpoint_restore_args(it)))``)."""
    return grain.checkpoint.CheckpointRestore(iterator)

"""The uint8 image operations of the original's reference augmentation (albumentations 0.4.3's ``Resize``,
``Rotate``, ``Blur``, ``ElasticTransform``), as the same OpenCV calls albumentations makes.

These call ``cv2`` (opencv-python-headless, a runtime dependency) with albumentations' flags (INTER_LINEAR,
BORDER_REFLECT_101), so they are exact by construction; ``tests/test_data_pipeline.py`` also pins them to
goldens produced by opencv-python 4.10. OpenCV runs single-threaded here (``cv2.setNumThreads(1)``): one grain
worker per core. The elastic displacement field is scipy's ``gaussian_filter`` (what albumentations calls with
``approximate=False``), computed with FFTs (:func:`gaussian_filter_reflect`).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

# One OpenCV thread: the data pipeline runs one grain worker per core, and OpenCV's own pool would oversubscribe it.
cv2.setNumThreads(1)

ELASTIC_ALPHA, ELASTIC_SIGMA, ELASTIC_ALPHA_AFFINE = 1.0, 50.0, 50.0


def _keep_channels(out: np.ndarray, img: np.ndarray) -> np.ndarray:
    """OpenCV returns (h, w) for a (h, w, 1) input; restore the channel axis."""
    return out.reshape(out.shape[:2] + img.shape[2:])


def cv2_resize_linear(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(img, (width, height), interpolation=INTER_LINEAR)`` (albumentations' ``Resize``) for uint8
    (h, w[, c]): half-pixel centres, no antialias; the input itself when the size already matches."""
    if img.shape[:2] == (height, width):
        return img
    return _keep_channels(cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR), img)


def cv2_warp_affine(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``cv2.warpAffine(img, M, (w, h), flags=INTER_LINEAR, borderMode=BORDER_REFLECT_101)`` for uint8 (h, w[, c]);
    M (2×3) maps source to destination pixel coordinates (x, y)."""
    h, w = img.shape[:2]
    out = cv2.warpAffine(img, np.asarray(matrix, np.float64), (w, h), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REFLECT_101)
    return _keep_channels(out, img)


def cv2_remap(img: np.ndarray, map_x: np.ndarray, map_y: np.ndarray) -> np.ndarray:
    """``cv2.remap(img, map_x, map_y, INTER_LINEAR, borderMode=BORDER_REFLECT_101)`` with float32 maps (h, w)."""
    out = cv2.remap(img, np.asarray(map_x, np.float32), np.asarray(map_y, np.float32), cv2.INTER_LINEAR,
                    borderMode=cv2.BORDER_REFLECT_101)
    return _keep_channels(out, img)


def cv2_rotation_matrix(center: tuple[float, float], angle: float, scale: float = 1.0) -> np.ndarray:
    """``cv2.getRotationMatrix2D``: counter-clockwise by ``angle`` degrees about ``center`` (x, y); (2, 3) float64."""
    return cv2.getRotationMatrix2D((float(center[0]), float(center[1])), float(angle), float(scale))


def cv2_box_blur(img: np.ndarray, ksize: int) -> np.ndarray:
    """``cv2.blur(img, (k, k))`` for uint8: normalised box filter, BORDER_REFLECT_101 (OpenCV's default), rounded."""
    return _keep_channels(cv2.blur(img, (ksize, ksize)), img)


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
    then a displacement field ``gaussian_filter(U(−1, 1), sigma)·alpha`` (:func:`gaussian_filter_reflect`)
    applied with ``cv2.remap``; uint8 (h, w[, c]) in and out."""
    rs = np.random.RandomState(random_state)
    h, w = img.shape[:2]
    center = np.float32((h, w)) // 2
    square = min((h, w)) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    pts2 = pts1 + rs.uniform(-alpha_affine, alpha_affine, size=pts1.shape).astype(np.float32)
    img = cv2_warp_affine(img, cv2.getAffineTransform(pts1, pts2))
    dx = np.float32(gaussian_filter_reflect(rs.rand(h, w) * 2 - 1, sigma) * alpha)
    dy = np.float32(gaussian_filter_reflect(rs.rand(h, w) * 2 - 1, sigma) * alpha)
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    return cv2_remap(img, np.float32(x + dx), np.float32(y + dy))

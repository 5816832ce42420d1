"""Sketch extraction: PiDiNet edge maps (the original's training sketches) and a weight-free XDoG sketcher.

PiDiNet (SPEC §3.7)
-------------------
Paint-by-Sketch made its sketches with ``pidinet_converted --config carv4 --sa --dil`` and the
``table5_pidinet.pth`` weights, single scale at the native resolution:

1. pre-processing (``Custom_Loader``): ``ToTensor()`` (``x / 255`` in float32) then ImageNet
   ``Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])`` -> :func:`preprocess_pidinet`;
2. the network -> five sigmoid maps ``[e1, e2, e3, e4, fuse]`` (:func:`pidinet_maps`); the fused map
   (:func:`pidinet_edges`) is the edge probability, white (1) on edges;
3. PiDiNet's ``test()`` saves ``(fuse * 255).astype(uint8)`` (truncation, :func:`fuse_to_uint8`);
4. Paint-by-Sketch's ``binarize_sketch.py``: ``> 153 -> 255``, ``<= 153 -> 0`` (edge probability > 0.6),
   white lines on black (:func:`binarize_fuse`).

:class:`PidinetSketcher` holds the params and runs 1-4 as one jitted function (compiled once per input
shape, batched).

XDoG
----
:func:`xdog_sketch` needs no weights: the eXtended Difference-of-Gaussians of Winnemöller et al. (2012)
on the luminance, thresholded to a binary line drawing, returned in the same convention as the PiDiNet
sketches (uint8, 255 = line, 0 = background). It suits flat-coloured cartoons / line art.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from sketchcomp_jax.models.pidinet import PIDINET_FUSE, PiDiNet

__all__ = [
    "BINARIZE_THRESHOLD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PidinetSketcher",
    "binarize_fuse",
    "fuse_to_uint8",
    "pidinet_edges",
    "pidinet_maps",
    "preprocess_pidinet",
    "xdog_sketch",
    "xdog_soft",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# binarize_sketch.py: "follow deepfill v2 0.6 threshold", applied to the uint8 map (0.6 * 255 = 153).
BINARIZE_THRESHOLD = 153


def _xp(x: Any):
    """numpy for numpy / Python inputs, jax.numpy for jax arrays and tracers."""
    return jnp if isinstance(x, jax.Array) else np


def _check_images(images: Any) -> None:
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"expected a batch of RGB images (B, H, W, 3), got shape {shape}")
    dtype = np.dtype(images.dtype) if hasattr(images, "dtype") else None
    if dtype != np.uint8:
        raise ValueError(f"expected uint8 images (0..255), got dtype {dtype}; convert with np.asarray(img, np.uint8)")


def _normalize_table() -> np.ndarray:
    """(3, 256) float32: ``(v / 255 - mean[c]) / std[c]`` for every uint8 value ``v``, computed in float32
    with true divisions exactly as torchvision does (``ToTensor``: ``x.float().div(255)``;
    ``Normalize``: ``sub_(mean).div_(std)``)."""
    v = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None]
    return ((v - mean) / std).astype(np.float32)


_NORMALIZE_TABLE = _normalize_table()


def preprocess_pidinet(images_uint8_nhwc: Any) -> jax.Array:
    """(B, H, W, 3) uint8 -> (B, H, W, 3) float32: ``(x / 255 - mean) / std`` (ToTensor + Normalize).

    Bit-identical to torchvision's ``Normalize(ToTensor(img))`` in float32: a 256-entry look-up table per
    channel, computed once with numpy (XLA's CPU backend would turn ``x / c`` into ``x * (1 / c)``, which
    is off by one ulp for ~40 % of the pixels). Jittable.
    """
    x = jnp.asarray(images_uint8_nhwc)
    if x.dtype != jnp.uint8:
        raise ValueError(f"preprocess_pidinet expects uint8 images, got {x.dtype}")
    table = jnp.asarray(_NORMALIZE_TABLE)
    idx = x.astype(jnp.int32)
    return jnp.stack([table[c][idx[..., c]] for c in range(3)], axis=-1)


def pidinet_maps(params: Any, images_uint8_nhwc: Any, *, model: PiDiNet | None = None) -> jax.Array:
    """All five PiDiNet sigmoid maps, (B, H, W, 5) float32, channels ``[e1, e2, e3, e4, fuse]``.

    ``params`` is the Flax params tree from
    :func:`sketchcomp_jax.weights.pidinet_weights.load_pidinet_params`. Jittable (not jitted here;
    see :class:`PidinetSketcher`).
    """
    model = PiDiNet() if model is None else model
    return model.apply({"params": params}, preprocess_pidinet(images_uint8_nhwc))


def pidinet_edges(params: Any, images_uint8_nhwc: Any, *, model: PiDiNet | None = None) -> jax.Array:
    """The fused PiDiNet edge map (edge probability in [0, 1], 1 = edge), (B, H, W) float32."""
    return pidinet_maps(params, images_uint8_nhwc, model=model)[..., PIDINET_FUSE]


def fuse_to_uint8(fuse: Any) -> Any:
    """``(fuse * 255).astype(uint8)``: PiDiNet ``test()``'s PNG, truncating (not rounding), float32 product.

    numpy in -> numpy out, jax in -> jax out.
    """
    xp = _xp(fuse)
    return (xp.asarray(fuse, dtype=xp.float32) * xp.float32(255.0)).astype(xp.uint8)


def binarize_fuse(fuse: Any, threshold: int = BINARIZE_THRESHOLD) -> Any:
    """Paint-by-Sketch's binarisation: uint8 {0, 255} with 255 where ``uint8(fuse * 255) > 153``.

    ``fuse`` is the float edge probability (truncated to uint8 first, as the original saved it to PNG)
    or an already-uint8 map. numpy in -> numpy out, jax in -> jax out.
    """
    xp = _xp(fuse)
    u8 = fuse if np.dtype(fuse.dtype) == np.uint8 else fuse_to_uint8(fuse)
    return xp.where(u8 > threshold, xp.uint8(255), xp.uint8(0)).astype(xp.uint8)


class PidinetSketcher:
    """Batched, jitted PiDiNet sketch extraction holding its params.

    ``PidinetSketcher(params)`` or ``PidinetSketcher.from_checkpoint("table5_pidinet.pth")``. Every method
    takes uint8 RGB images ``(B, H, W, 3)`` (or one ``(H, W, 3)`` image, returned without the batch axis)
    and returns numpy arrays. The computation (pre-processing, network, post-processing) is one jitted
    function per method, compiled once per input shape (JAX's jit cache); batches of different sizes
    or resolutions each compile once.

    * ``__call__`` / ``sketch``: binary sketch, uint8 {0, 255}, white lines on black, (B, H, W);
    * ``fuse_uint8``: PiDiNet's saved PNG ``uint8(fuse * 255)``, (B, H, W);
    * ``edges``: fused edge probability, float32 (B, H, W);
    * ``maps``: all five maps ``[e1, e2, e3, e4, fuse]``, float32 (B, H, W, 5).
    """

    def __init__(self, params: Any, *, model: PiDiNet | None = None, threshold: int = BINARIZE_THRESHOLD):
        self.model = PiDiNet() if model is None else model
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self.threshold = int(threshold)
        model_ = self.model
        thr = self.threshold

        def maps(p, x):
            return pidinet_maps(p, x, model=model_)

        def edges(p, x):
            return maps(p, x)[..., PIDINET_FUSE]

        self._maps = jax.jit(maps)
        self._edges = jax.jit(edges)
        self._fuse_uint8 = jax.jit(lambda p, x: fuse_to_uint8(edges(p, x)))
        self._sketch = jax.jit(lambda p, x: binarize_fuse(edges(p, x), thr))

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, **kwargs: Any) -> "PidinetSketcher":
        """Loads ``table5_pidinet.pth`` (or a ``.safetensors`` copy, converted or not)."""
        from sketchcomp_jax.weights.pidinet_weights import load_pidinet_params

        return cls(load_pidinet_params(path), **kwargs)

    def _run(self, fn: Callable, images: Any) -> np.ndarray:
        images = np.asarray(images)
        single = images.ndim == 3
        if single:
            images = images[None]
        _check_images(images)
        out = np.asarray(fn(self.params, images))
        return out[0] if single else out

    def maps(self, images: Any) -> np.ndarray:
        return self._run(self._maps, images)

    def edges(self, images: Any) -> np.ndarray:
        return self._run(self._edges, images)

    def fuse_uint8(self, images: Any) -> np.ndarray:
        return self._run(self._fuse_uint8, images)

    def sketch(self, images: Any) -> np.ndarray:
        return self._run(self._sketch, images)

    __call__ = sketch


# --------------------------------------------------------------------------------------------------
# XDoG
# --------------------------------------------------------------------------------------------------


def _luminance01(image: Any) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        img = img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
    elif img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0].astype(np.float64)
    elif img.ndim != 2:
        raise ValueError(f"xdog: expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {img.shape}")
    else:
        img = img.astype(np.float64)
    if np.asarray(image).dtype == np.uint8:
        img = img / 255.0
    elif img.size and (img.min() < 0.0 or img.max() > 1.0):
        raise ValueError("xdog: float images must lie in [0, 1]; uint8 images are divided by 255")
    return img


def xdog_soft(
    image: Any,
    *,
    sigma: float = 0.8,
    k: float = 1.6,
    p: float = 20.0,
    epsilon: float = -0.1,
    phi: float = 10.0,
    pre_blur: float = 0.0,
) -> np.ndarray:
    """The continuous XDoG image ``T`` in [0, 1] (1 = paper white, lower = ink), float64 (H, W).

    With ``L`` the luminance in [0, 1] (optionally pre-blurred by ``pre_blur``), ``g1 = G_sigma * L`` and
    ``g2 = G_{k sigma} * L`` (Gaussian blurs, edge-replicating borders)::

        u = (1 + p) g1 - p g2 = g1 + p (g1 - g2)          # sharpened image
        T = 1                              if u >= epsilon
            1 + tanh(phi (u - epsilon))    otherwise

    See :func:`xdog_sketch` for the meaning and choice of the parameters.
    """
    for name, value in (("sigma", sigma), ("k", k), ("phi", phi)):
        if not value > 0:
            raise ValueError(f"xdog: {name} must be > 0, got {value}")
    if k == 1.0:
        raise ValueError("xdog: k must differ from 1 (the two Gaussians would cancel)")
    lum = _luminance01(image)
    if pre_blur > 0:
        lum = ndimage.gaussian_filter(lum, pre_blur, mode="nearest")
    g1 = ndimage.gaussian_filter(lum, sigma, mode="nearest")
    g2 = ndimage.gaussian_filter(lum, sigma * k, mode="nearest")
    u = g1 + p * (g1 - g2)
    return np.where(u >= epsilon, 1.0, 1.0 + np.tanh(phi * (u - epsilon)))


def xdog_sketch(
    image_uint8_hwc: Any,
    *,
    sigma: float = 0.8,
    k: float = 1.6,
    p: float = 20.0,
    epsilon: float = -0.1,
    phi: float = 10.0,
    threshold: float = 0.5,
    pre_blur: float = 0.0,
) -> np.ndarray:
    """Binary XDoG line drawing: uint8 (H, W), 255 = line, 0 = background (PiDiNet sketch convention).

    ``image_uint8_hwc``: (H, W, 3) RGB (or RGBA, alpha ignored) uint8, or (H, W) grey; float images in
    [0, 1] are accepted too. A pixel is a line where the soft XDoG value :func:`xdog_soft` is below
    ``threshold``. Parameters:

    * ``sigma`` (0.8 px): scale of the inner Gaussian; sets the line width (larger -> thicker lines and
      fewer small details).
    * ``k`` (1.6): ratio of the outer to the inner Gaussian (1.6 makes the DoG approximate a Laplacian
      of Gaussian).
    * ``p`` (20): strength of the edge sharpening ``u = g1 + p (g1 - g2)``; larger -> weaker contrasts
      (fainter colour boundaries) also become lines.
    * ``epsilon`` (-0.1): ink level. ``u`` equals the luminance in flat regions, so with ``epsilon < 0``
      no flat region -- of any colour, black included -- turns into ink; only pixels darker than their
      surroundings (dark outlines, the dark side of a colour boundary) do. ``epsilon >= 0`` gives the
      classic XDoG look where dark areas fill in black.
    * ``phi`` (10): steepness of the tanh soft threshold; with ``threshold`` 0.5 a pixel is a line when
      ``u < epsilon - atanh(0.5) / phi`` (about ``epsilon - 0.055``). Larger ``phi`` -> a harder cut.
    * ``threshold`` (0.5): binarisation level on the soft XDoG output.
    * ``pre_blur`` (0): optional extra Gaussian blur (pixels) of the luminance, against JPEG noise or
      screen tones.

    The defaults give clean, 1-3 px lines on flat-colour cartoons with dark outlines; they are a
    weight-free stand-in, not a reproduction of the PiDiNet sketches the paper trained on.
    """
    soft = xdog_soft(image_uint8_hwc, sigma=sigma, k=k, p=p, epsilon=epsilon, phi=phi, pre_blur=pre_blur)
    return np.where(soft < threshold, np.uint8(255), np.uint8(0)).astype(np.uint8)

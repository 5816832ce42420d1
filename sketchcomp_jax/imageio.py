"""User-boundary image handling: loading (paths, PIL, arrays) and the original demo's conversions.

All functions return NHWC-friendly numpy arrays. Resizing uses Pillow's BICUBIC, the default of the
original's `PIL.Image.resize` calls (Pillow ≥ 7).
"""
from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Union

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)
ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]

# Size limits of user images (source, mask, sketch, reference). The maximum is Pillow's own decompression-bomb
# threshold (~89.5 megapixels, e.g. 9459×9459): above it Pillow warns, above twice it refuses with a traceback;
# we refuse with one line instead, before decoding anything. The minimum is one latent pixel of the VAE
# (factor 8): a smaller picture carries no usable content (and a 1×1 source would give a 1×1 result).
MAX_IMAGE_PIXELS = 89_478_485
MIN_IMAGE_SIDE = 8


def check_image_size(size: tuple[int, int], what: str = "image", where: object = "") -> None:
    """Refuses (ValueError) a (W, H) size outside [MIN_IMAGE_SIDE, …] per side and ≤ MAX_IMAGE_PIXELS in all."""
    w, h = size
    name = f"{what} {where}".strip()
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels, above the limit of "
                         f"{MAX_IMAGE_PIXELS / 1e6:.1f} MP; downscale it first")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name} is {w}x{h}; each side must be at least {MIN_IMAGE_SIDE} pixels")


def _checked_path(source: str | os.PathLike, what: str) -> pathlib.Path:
    """`source` as a path to an existing file; an empty path, a directory or a missing file raise."""
    if not os.fspath(source).strip():
        raise ValueError(f"{what}: the path is empty; give an image file")
    path = pathlib.Path(source)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def image_size(source: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(W, H) of an image file from its header only (nothing decoded), after the checks of `load_image`:
    a directory, a missing or non-image file, and a size outside the limits raise ValueError/FileNotFoundError."""
    path = _checked_path(source, what)
    try:
        with _open_header(path) as img:
            size = img.size
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path} is not a readable image ({e}); is the file complete?") from None
    check_image_size(size, what, path)
    return size


_HEADER_LOCK = threading.Lock()


def _open_header(path: pathlib.Path) -> Image.Image:
    """`Image.open` (reads the header only) without Pillow's bomb check, which would end in a warning or a
    traceback: `check_image_size` applies our own limit, with a one-line message, before any pixel is decoded.
    The switch is process-global, hence the lock; decoding happens after it is restored."""
    with _HEADER_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old


def check_box(box, size: tuple[int, int], what: str = "reference_box") -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), exclusive ends, checked against a (W, H) image: an inverted or empty box and a box
    reaching outside the image are refused (ValueError) with different messages."""
    x0, y0, x1, y1 = (int(v) for v in box)
    w, h = size
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{what} ({x0},{y0},{x1},{y1}) is inverted or empty: it needs x0 < x1 and y0 < y1 "
                         "(x0,y0 = top-left, x1,y1 = bottom-right, exclusive)")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise ValueError(f"{what} ({x0},{y0},{x1},{y1}) is not inside the {w}x{h} source image; keep "
                         f"0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
    return x0, y0, x1, y1


def load_image(source: ImageLike, what: str = "image") -> Image.Image:
    """A PIL image from a path, a PIL image, or an array (H,W) / (H,W,C) uint8, or float in [0, 1].

    Raises ValueError/FileNotFoundError naming `what` and the path for missing, corrupt or non-image files,
    a directory, and files of a size outside [MIN_IMAGE_SIDE per side, MAX_IMAGE_PIXELS] (checked before
    decoding). Arrays and PIL images are taken at any size (the app's paint layers; the pipeline checks the
    source image's size itself).
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{what}: got a channels-first array {arr.shape}; pass (H, W, C)")
        if arr.ndim not in (2, 3):
            raise ValueError(f"{what}: expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 1:
                raise ValueError(f"{what}: float arrays must be in [0, 1] (got [{arr.min():.3g}, {arr.max():.3g}])")
            arr = (arr * 255).round().astype(np.uint8)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        return Image.fromarray(arr)
    path = _checked_path(source, what)
    try:
        with _open_header(path) as img:
            check_image_size(img.size, what, path)
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{what} {path} is not a readable image ({e}); is the file complete?") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB conversion for any mode; transparent pixels of RGBA/LA/P images become black (as the demo's
    canvases do with `.convert('RGB')`), 16-bit grayscale is scaled to 8 bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        scale = 257.0 if arr.max() > 255 else 1.0
        img = Image.fromarray(np.clip(arr / scale, 0, 255).astype(np.uint8))
    return img.convert("RGB")


def to_unit_range(img: Image.Image) -> np.ndarray:
    """RGB PIL image → (H, W, 3) float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    return (np.asarray(img, np.float32) / 255.0 - 0.5) / 0.5


def keep_mask_from_image(mask: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Mask picture (white = region to fill) → keep-mask (H, W, 1) float32 in {0, 1}, 1 = keep.

    As the demo: `.convert('L').resize(size)`, `m = 1 − L/255`, `m < 0.5 → 0`, `≥ 0.5 → 1`. An alpha
    channel (a canvas with transparent background) counts as painted where opaque.
    """
    if mask.mode in ("RGBA", "LA") or (mask.mode == "P" and "transparency" in mask.info):
        rgba = mask.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3].astype(np.float32) / 255
        lum = np.asarray(rgba.convert("L"), np.float32) * alpha
        mask = Image.fromarray(lum.astype(np.uint8))
    m = np.asarray(to_gray(mask).resize(size, Image.BICUBIC), np.float32)
    m = 1.0 - m / 255.0
    return np.where(m < 0.5, 0.0, 1.0).astype(np.float32)[..., None]


def to_gray(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        return to_rgb(img).convert("L")
    return img.convert("L")


def sketch_from_image(sketch: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Sketch picture → (H, W, 3) float32 in [-1, 1], white strokes (+1) on black (−1).

    A drawing with black strokes on white (more than half of the pixels bright) is inverted, and the
    log says so.
    """
    rgb = to_rgb(sketch).resize(size, Image.BICUBIC)
    arr = np.asarray(rgb, np.float32)
    if arr.mean() > 127.5:
        log.warning("sketch looks like dark strokes on a light background: inverting it to white-on-black")
        arr = 255.0 - arr
    return (arr / 255.0 - 0.5) / 0.5


def to_uint8(images01: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8 by truncation, as the original demo (`(255 * x).astype(uint8)`)."""
    return (255.0 * np.clip(images01, 0.0, 1.0)).astype(np.uint8)


def hole_bbox(keep_mask: np.ndarray, pad: int = 10) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of the hole (keep_mask == 0) in an (H, W[,1]) mask, padded by `pad`
    pixels and clipped to the image (`eval_dataloader.py`'s `mask_to_bbox`). None when there is no hole."""
    hole = np.asarray(keep_mask).reshape(keep_mask.shape[:2]) < 0.5
    rows, cols = np.where(hole)
    if rows.size == 0:
        return None
    h, w = hole.shape
    return (max(int(cols.min()) - pad, 0), max(int(rows.min()) - pad, 0),
            min(int(cols.max()) + 1 + pad, w), min(int(rows.max()) + 1 + pad, h))

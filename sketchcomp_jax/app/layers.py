"""Painted layers (web-UI editor layers, notebook canvas layers) → the pipeline's mask and sketch pictures.

A drawing layer is an RGBA image the size of the source image, transparent where nothing was painted.
Only *where* paint is matters, not its colour: a pixel counts as painted where the layer is at least
half opaque (`ALPHA_THRESHOLD`), so the antialiased fringe of a brush stroke is split evenly.

Outputs follow the pipeline's conventions (docs/sample.md):
  * mask: mode "L", 255 = region to fill, 0 = keep;
  * sketch: mode "L", 255 = stroke, 0 = background (white strokes on black).
"""
from __future__ import annotations

import base64
import io
from typing import Any, Sequence

import numpy as np
from PIL import Image

from sketchcomp_jax import imageio

ALPHA_THRESHOLD = 128


def painted_pixels(layer: Any) -> np.ndarray:
    """(H, W) bool: where a layer is painted.

    `layer`: RGBA/LA (painted = alpha ≥ ALPHA_THRESHOLD), or a layer without alpha, L/RGB (painted =
    luminance ≥ ALPHA_THRESHOLD, i.e. bright paint on black); as a PIL image or an (H, W[, C]) uint8 array.
    """
    img = imageio.load_image(layer, "layer")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        alpha = np.asarray(img.convert("RGBA"))[..., 3]
        return alpha >= ALPHA_THRESHOLD
    return np.asarray(imageio.to_gray(img)) >= ALPHA_THRESHOLD


def _fit(mask: np.ndarray, size: tuple[int, int], what: str) -> np.ndarray:
    """A (H, W) bool layer brought to `size` = (W, H) of the source image.

    Layers are drawn in the source's pixel grid; a different size with the same aspect ratio (a canvas
    exported at another scale) is resized with nearest neighbour, a different aspect ratio is an error
    because the strokes could not be placed on the image.
    """
    h, w = mask.shape
    if (w, h) == tuple(size):
        return mask
    if abs(w / h - size[0] / size[1]) > 0.02:
        raise ValueError(
            f"the {what} layer is {w}x{h} but the source image is {size[0]}x{size[1]} (another aspect ratio): "
            f"draw the {what} on the uploaded image itself"
        )
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(tuple(size), Image.NEAREST)
    return np.asarray(resized) >= 128


def _painted_picture(layer: Any, size: tuple[int, int] | None, what: str) -> Image.Image | None:
    """Mode-L picture, 255 where painted and 0 elsewhere, fitted to `size` (W, H); None when nothing is painted."""
    paint = painted_pixels(layer)
    if size is not None:
        paint = _fit(paint, size, what)
    if not paint.any():
        return None
    return Image.fromarray(np.where(paint, 255, 0).astype(np.uint8), "L")


def mask_from_layer(layer: Any, size: tuple[int, int] | None = None) -> Image.Image | None:
    """Mask picture (mode L, 255 = fill) from a painted layer, or None when nothing is painted.
    `size`: (W, H) of the source image (default: the layer's own size)."""
    return _painted_picture(layer, size, "mask")


def sketch_from_layer(layer: Any, size: tuple[int, int] | None = None) -> Image.Image | None:
    """Sketch picture (mode L, white strokes on black) from a painted layer, or None when it is empty."""
    return _painted_picture(layer, size, "sketch")


def decode_data_url(url: str | None, what: str = "image") -> Image.Image | None:
    """`data:image/png;base64,...` (a browser canvas export) → PIL image; None for an empty string."""
    if not url:
        return None
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or ";base64" not in header:
        raise ValueError(f"{what}: expected a base64 image data URL, got {url[:40]!r}")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as img:
            img.load()
            return img.copy()
    except (OSError, ValueError) as e:
        raise ValueError(f"{what}: the data URL is not a readable image ({e})") from None


def encode_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def parse_box(box: Sequence[Any] | str | None, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """A self-reference box (x0, y0, x1, y1), exclusive ends, in source pixels, checked against
    `size` = (W, H). Accepts a sequence of 4 numbers or "x0,y0,x1,y1"; None/empty/all-zero → None."""
    if box is None or (isinstance(box, str) and not box.strip()):
        return None
    values = box.split(",") if isinstance(box, str) else list(box)
    if len(values) != 4:
        raise ValueError(f"the reference box needs four numbers x0,y0,x1,y1, got {box!r}")
    try:
        x0, y0, x1, y1 = (int(round(float(v))) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"the reference box needs four numbers x0,y0,x1,y1, got {box!r}") from None
    if (x0, y0, x1, y1) == (0, 0, 0, 0):
        return None
    w, h = size
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(
            f"the reference box ({x0}, {y0}, {x1}, {y1}) is not inside the {w}x{h} source image; "
            "give x0 < x1 ≤ width and y0 < y1 ≤ height"
        )
    return x0, y0, x1, y1

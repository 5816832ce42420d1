"""One Paint-by-Sketch training sample from an image and its sketch: the original's recipe, step by step.

Follows ``ldm/data/danbooru.py`` of Paint-by-Sketch (the same as Paint-by-Example's ``open-images.py``; SPEC
§2.3, §3.5-3.6): RoI, reference crop + augmentation (:mod:`sketchcomp_jax.data.image_ops`), extended box,
Bézier or rectangle mask, zoomed square crop, no-antialias bilinear resize; see :func:`make_sample` and
docs/data_pipeline.md. Pure numpy / PIL / OpenCV (grain worker processes import it; no flax, no networks).

Output arrays are float32 NHWC-per-sample: ``gt`` (R,R,3) in [-1, 1]; ``keep_mask`` (R,R,1), 1 = keep;
``sketch`` (R,R,3) in [-1, 1], white lines = +1; ``reference`` (S,S,3) CLIP-normalised.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from sketchcomp_jax.data.image_ops import (
    cv2_box_blur,
    cv2_resize_linear,
    cv2_rotation_matrix,
    cv2_warp_affine,
    elastic_transform,
)
from sketchcomp_jax.models.clip_norm import CLIP_MEAN, CLIP_STD
from sketchcomp_jax.ops.resize import resize_u8_bilinear  # T.Resize: no-antialias bilinear

# The original's constants.
REFERENCE_PAD = 10  # px added around the RoI for the reference crop (clipped to the image)
EXTEND_FRACTION = 0.4  # the extended box pushes each side by randint(0, int(0.4 · free space))
BEZIER_JITTER = 5  # randint(-5, 5) added to every Bézier point
CROP_FREE_FRACTION = 0.6  # the square crop trims randint(0, int(0.6 · free)) on every side
ROTATE_LIMIT = 20.0
P_FLIP, P_ROTATE, P_BLUR, P_ELASTIC = 0.5, 0.5, 0.3, 0.3
BLUR_KSIZES = (3, 5, 7)
EVAL_SEED_SALT = 77  # the original re-seeds with index·77 in validation; we seed with (seed, 77, index)



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
    blur, elastic — each the uint8 OpenCV call albumentations makes (:mod:`sketchcomp_jax.data.image_ops`)."""
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

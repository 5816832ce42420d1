"""A procedural cartoon data set with exact line art: the default data of the demo config and the tests.

Each image is a small webtoon-style scene: flat-colour bands of sky and ground, hills, a sun or moon,
clouds, houses and trees standing on the ground, and blob characters with eyes, all with black
outlines. The sketch is not detected but *drawn*: every shape is rasterised twice with the same PIL
call, once in colour with a black outline on the image and once as "fill 0, outline 255" on the line
canvas, so later shapes hide earlier lines exactly as they hide them in the image. Fill colours are
never pure black, so the sketch is exactly the set of black pixels of the image (white on black).

Scenes are deterministic per (seed, index). :func:`write_synthetic_dataset` writes them in the record
format of :mod:`sketchcomp_jax.data.records` (same splits rule and resumable shards as real data).
"""
from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from sketchcomp_jax import paths
from sketchcomp_jax.data import records

SKETCHER_NAME = "synthetic"

SKIES = [(135, 206, 235), (255, 183, 120), (190, 170, 230), (40, 52, 110), (170, 225, 250), (250, 220, 160)]
GROUNDS = [(110, 190, 90), (80, 160, 80), (230, 210, 150), (150, 200, 110), (120, 170, 160), (240, 240, 245)]
HILLS = [(90, 170, 100), (70, 140, 120), (150, 180, 90), (120, 150, 170), (170, 150, 120)]
WALLS = [(240, 220, 180), (250, 250, 240), (210, 160, 130), (180, 200, 230), (250, 200, 200)]
ROOFS = [(200, 60, 50), (60, 90, 160), (120, 70, 40), (90, 120, 60), (160, 60, 120)]
BODIES = [(255, 120, 120), (120, 200, 255), (255, 220, 90), (160, 230, 140), (230, 150, 250), (255, 170, 80)]
LEAVES = [(60, 150, 70), (90, 180, 60), (40, 120, 80), (200, 120, 60)]
TRUNK = (130, 90, 60)
CLOUD = (250, 250, 255)
SUN = (255, 220, 60)
MOON = (245, 245, 210)
WHITE_EYE = (255, 255, 255)
INK = (0, 0, 0)


class _Painter:
    """Draws each shape on the colour image (fill + black outline) and on the line canvas (fill 0 +
    outline 255) with identical geometry."""

    def __init__(self, size: int, line_width: int):
        self.image = Image.new("RGB", (size, size), (128, 128, 128))
        self.lines = Image.new("L", (size, size), 0)
        self._di = ImageDraw.Draw(self.image)
        self._dl = ImageDraw.Draw(self.lines)
        self.w = line_width

    def polygon(self, points: Sequence[tuple[float, float]], fill: tuple[int, int, int], outline: bool = True) -> None:
        pts = [(float(x), float(y)) for x, y in points]
        if outline:
            self._di.polygon(pts, fill=fill, outline=INK, width=self.w)
            self._dl.polygon(pts, fill=0, outline=255, width=self.w)
        else:
            self._di.polygon(pts, fill=fill)
            self._dl.polygon(pts, fill=0)

    def rectangle(self, box: Sequence[float], fill: tuple[int, int, int], outline: bool = True) -> None:
        box = [float(v) for v in box]
        if outline:
            self._di.rectangle(box, fill=fill, outline=INK, width=self.w)
            self._dl.rectangle(box, fill=0, outline=255, width=self.w)
        else:
            self._di.rectangle(box, fill=fill)
            self._dl.rectangle(box, fill=0)

    def ellipse(self, box: Sequence[float], fill: tuple[int, int, int], outline: bool = True) -> None:
        box = [float(v) for v in box]
        if outline:
            self._di.ellipse(box, fill=fill, outline=INK, width=self.w)
            self._dl.ellipse(box, fill=0, outline=255, width=self.w)
        else:
            self._di.ellipse(box, fill=fill)
            self._dl.ellipse(box, fill=0)

    def ink_ellipse(self, box: Sequence[float]) -> None:
        """A solid black shape (pupils): line art in the sketch too."""
        box = [float(v) for v in box]
        self._di.ellipse(box, fill=INK)
        self._dl.ellipse(box, fill=255)

    def line(self, points: Sequence[tuple[float, float]], width: int | None = None) -> None:
        pts = [(float(x), float(y)) for x, y in points]
        w = self.w if width is None else width
        self._di.line(pts, fill=INK, width=w)
        self._dl.line(pts, fill=255, width=w)

    def arc(self, box: Sequence[float], start: float, end: float) -> None:
        box = [float(v) for v in box]
        self._di.arc(box, start, end, fill=INK, width=self.w)
        self._dl.arc(box, start, end, fill=255, width=self.w)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 12) -> tuple[int, int, int]:
    """A colour near `colour`, never pure black (black is reserved for the line art)."""
    c = np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 1, 255)
    return tuple(int(v) for v in c)


def _house(p: _Painter, rng: np.random.Generator, x: float, ground_y: float, s: float) -> None:
    w = s * rng.uniform(0.16, 0.26)
    h = w * rng.uniform(0.7, 1.1)
    top = ground_y - h
    p.rectangle([x, top, x + w, ground_y], _jitter(rng, _pick(rng, WALLS)))
    roof_h = w * rng.uniform(0.35, 0.6)
    over = w * 0.12
    p.polygon([(x - over, top), (x + w / 2, top - roof_h), (x + w + over, top)], _jitter(rng, _pick(rng, ROOFS)))
    dw = w * 0.22
    dx = x + w * rng.uniform(0.15, 0.6)
    p.rectangle([dx, ground_y - h * 0.5, dx + dw, ground_y], _jitter(rng, _pick(rng, ROOFS)))
    win = w * 0.18
    wx = x + w * 0.08 if dx > x + w * 0.4 else x + w - w * 0.08 - win
    wy = top + h * 0.18
    p.rectangle([wx, wy, wx + win, wy + win], (170, 220, 250))
    p.line([(wx + win / 2, wy), (wx + win / 2, wy + win)], width=1)
    p.line([(wx, wy + win / 2), (wx + win, wy + win / 2)], width=1)


def _tree(p: _Painter, rng: np.random.Generator, x: float, ground_y: float, s: float) -> None:
    th = s * rng.uniform(0.08, 0.14)
    tw = s * rng.uniform(0.025, 0.04)
    p.rectangle([x - tw / 2, ground_y - th, x + tw / 2, ground_y], TRUNK)
    r = s * rng.uniform(0.06, 0.1)
    cy = ground_y - th - r * 0.7
    p.ellipse([x - r, cy - r, x + r, cy + r], _jitter(rng, _pick(rng, LEAVES)))


def _character(p: _Painter, rng: np.random.Generator, cx: float, ground_y: float, s: float) -> None:
    bw = s * rng.uniform(0.14, 0.24)
    bh = bw * rng.uniform(0.9, 1.4)
    body = _jitter(rng, _pick(rng, BODIES))
    bottom = ground_y + s * rng.uniform(0.0, 0.12)
    top = bottom - bh
    # feet, then the body over them, then arms
    fw = bw * 0.28
    for sx in (-1, 1):
        fx = cx + sx * bw * 0.22
        p.ellipse([fx - fw / 2, bottom - fw * 0.45, fx + fw / 2, bottom + fw * 0.3], body)
    p.ellipse([cx - bw / 2, top, cx + bw / 2, bottom], body)
    if rng.uniform() < 0.7:
        for sx in (-1, 1):
            ax = cx + sx * bw * 0.5
            ay = top + bh * 0.55
            p.line([(ax, ay), (ax + sx * bw * 0.25, ay - bh * rng.uniform(0.0, 0.3))])
    # eyes: white with outline and a solid pupil
    er = bw * rng.uniform(0.09, 0.14)
    ey = top + bh * rng.uniform(0.3, 0.42)
    gap = bw * rng.uniform(0.14, 0.2)
    look = rng.uniform(-0.4, 0.4) * er
    for sx in (-1, 1):
        ex = cx + sx * gap
        p.ellipse([ex - er, ey - er * 1.2, ex + er, ey + er * 1.2], WHITE_EYE)
        pr = er * 0.45
        p.ink_ellipse([ex + look - pr, ey - pr, ex + look + pr, ey + pr])
    mw = bw * rng.uniform(0.12, 0.22)
    my = ey + er * 2.2
    p.arc([cx - mw, my - mw * 0.6, cx + mw, my + mw * 0.6], 20, 160)


def render_scene(seed: int, index: int, size: int = 256) -> tuple[np.ndarray, np.ndarray, str]:
    """One scene: (image uint8 (S,S,3), sketch uint8 (S,S) 255 = line, tags text). Deterministic."""
    if size < 32:
        raise ValueError(f"synthetic scenes need size ≥ 32, got {size}")
    rng = np.random.default_rng([int(seed), int(index), 0x5C37C4])
    s = float(size)
    lw = max(1, int(round(size / 128)))
    p = _Painter(size, lw)
    tags: list[str] = []

    sky_idx = int(rng.integers(len(SKIES)))
    night = sky_idx == 3
    p.rectangle([-lw, -lw, s + lw, s + lw], _jitter(rng, SKIES[sky_idx], 8), outline=False)
    tags.append("night" if night else "sky")

    horizon = s * rng.uniform(0.55, 0.75)
    # sun or moon
    if rng.uniform() < 0.8:
        r = s * rng.uniform(0.05, 0.1)
        cx, cy = s * rng.uniform(0.1, 0.9), s * rng.uniform(0.08, 0.35)
        p.ellipse([cx - r, cy - r, cx + r, cy + r], MOON if night else SUN)
        tags.append("moon" if night else "sun")
    # clouds
    n_clouds = int(rng.integers(0, 3))
    for _ in range(n_clouds):
        cx, cy = s * rng.uniform(0.0, 1.0), s * rng.uniform(0.08, 0.4)
        cw = s * rng.uniform(0.08, 0.14)
        for k in range(int(rng.integers(2, 4))):
            ox, oy = rng.uniform(-1.0, 1.0) * cw, rng.uniform(-0.3, 0.3) * cw
            r = cw * rng.uniform(0.45, 0.7)
            p.ellipse([cx + ox - r, cy + oy - r * 0.7, cx + ox + r, cy + oy + r * 0.7], CLOUD)
    if n_clouds:
        tags.append("clouds")
    # hills straddling the horizon; the ground band covers their lower half
    n_hills = int(rng.integers(0, 4))
    for _ in range(n_hills):
        hx = s * rng.uniform(-0.1, 1.1)
        hw = s * rng.uniform(0.25, 0.55)
        hh = s * rng.uniform(0.1, 0.25)
        p.ellipse([hx - hw / 2, horizon - hh, hx + hw / 2, horizon + hh], _jitter(rng, _pick(rng, HILLS)))
    if n_hills:
        tags.append("hills")
    # the ground band (its top edge is the horizon line)
    p.rectangle([-lw - 1, horizon, s + lw + 1, s + lw + 1], _jitter(rng, _pick(rng, GROUNDS), 8))
    tags.append("grass" if not night else "field")

    # houses and trees on the horizon line
    objects = int(rng.integers(1, 5))
    xs = np.sort(rng.uniform(0.0, 0.85, objects)) * s
    n_house = n_tree = 0
    for x in xs:
        if rng.uniform() < 0.5:
            _house(p, rng, float(x), horizon + s * rng.uniform(0.0, 0.05), s)
            n_house += 1
        else:
            _tree(p, rng, float(x) + s * 0.05, horizon + s * rng.uniform(0.0, 0.05), s)
            n_tree += 1
    if n_house:
        tags.append("house")
    if n_tree:
        tags.append("tree")
    # characters in front
    n_chars = int(rng.integers(1, 3))
    for _ in range(n_chars):
        _character(p, rng, s * rng.uniform(0.15, 0.85), s * rng.uniform(0.78, 0.9), s)
    tags.append("1creature" if n_chars == 1 else f"{n_chars}creatures")

    image = np.asarray(p.image)
    sketch = np.asarray(p.lines)
    return image, sketch, " ".join(tags)


def _process_shard(seed: int, size: int):
    def process(split: str, indices) -> records.ShardOutput:
        out = []
        for i in indices:
            image, sketch, tags = render_scene(seed, i, size)
            out.append(records.serialize_record(
                image=records.encode_png(image), sketch_png=records.encode_png(sketch), tags=tags,
                id=synthetic_id(i), height=size, width=size,
            ))
        return records.ShardOutput(out)

    return process


# Every word `render_scene` puts in the tags (a test keeps this list complete).
TAG_WORDS = ("sky", "night", "sun", "moon", "clouds", "hills", "grass", "field", "house", "tree", "1creature",
             "2creatures")
TOKENIZER_DIR = "tokenizer"


def write_synthetic_tokenizer(folder: str | os.PathLike) -> pathlib.Path:
    """A CLIP-format BPE tokenizer (`vocab.json`, `merges.txt`) whose merges spell every synthetic tag word,
    for training the text (Paint-by-T+S) baseline on the synthetic set. Deterministic."""
    from sketchcomp_jax.models.clip_tokenizer import learn_bpe, write_tokenizer_folder

    vocab, merges = learn_bpe([" ".join(TAG_WORDS)], num_merges=200)
    return write_tokenizer_folder(folder, vocab, merges)


def synthetic_id(index: int) -> str:
    return f"synthetic/{index:06d}"


def write_synthetic_dataset(
    out_dir: str, num_images: int, *, seed: int = 0, size: int = 256, test_fraction: float = 0.2,
    shard_size: int = 1000, progress: bool = False, overwrite: bool = False,
) -> str:
    """Writes ``num_images`` synthetic scenes to ``out_dir`` (train/test by the seeded id hash, as real
    data), and a CLIP tokenizer for their tags in ``out_dir/tokenizer``. Returns the dataset directory.
    Idempotent: a complete dataset with the same settings is left as it is; an interrupted one is resumed."""
    if num_images < 1:
        raise ValueError(f"num_images must be ≥ 1, got {num_images}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    out = paths.as_path(out_dir)  # local or gs://
    split_items: dict[str, list[int]] = {s: [] for s in records.SPLITS}
    for i in range(num_images):
        split_items[records.split_of(synthetic_id(i), seed=seed, test_fraction=test_fraction)].append(i)
    settings = {"kind": "synthetic", "num_images": num_images, "seed": seed, "size": size,
                "test_fraction": test_fraction}
    writer = records.ShardedDatasetWriter(
        out, fingerprint=settings, shard_size=shard_size, overwrite=overwrite,
        metadata={"sketcher": SKETCHER_NAME, "has_tags": True, "source": "synthetic", "settings": settings,
                  "created_by": "sketchcomp_jax.data.synthetic"},
        description=(f"sketchcomp-jax synthetic cartoon scenes ({num_images} images, {size}x{size}, seed {seed}); "
                     "sketches are the exact line art of each scene."),
    )
    if writer.summary_if_complete(split_items) is None:
        writer.write(split_items, _process_shard(seed, size), progress=progress, progress_desc="synthetic")
    if not (out / TOKENIZER_DIR / "merges.txt").is_file():
        write_synthetic_tokenizer(out / TOKENIZER_DIR)
    return os.fspath(out)

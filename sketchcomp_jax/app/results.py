"""Helpers shared by the notebook and the web UI: the sketch-drop sweep, side-by-side grids, saving."""
from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

from PIL import Image

DROP_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sweep_drop_fractions(pipe, image, mask, sketch, reference=None, *, fractions: Sequence[float] = DROP_FRACTIONS,
                         **kwargs: Any) -> list[Image.Image]:
    """One result per Sketch Plug-and-Drop fraction `f` (the sketch steers the first `int(steps·f)` steps),
    all with the same seed and settings so that only `f` differs. `kwargs` go to the pipeline call
    (`num_samples` is forced to 1). Each new fraction compiles its own sampling program once."""
    kwargs = {**kwargs, "num_samples": 1}
    return [pipe(image, mask, sketch, reference, sketch_drop_after=float(f), **kwargs).images[0] for f in fractions]


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """One row, no gaps: column i is `images[i]` (all must have the first image's size)."""
    if not images:
        raise ValueError("side_by_side needs at least one image")
    w, h = images[0].size
    if any(img.size != (w, h) for img in images):
        raise ValueError(f"side_by_side needs images of one size, got {[img.size for img in images]}")
    grid = Image.new("RGB", (w * len(images), h))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (i * w, 0))
    return grid


def save_images(images: Sequence[Image.Image], out_dir: str | os.PathLike, stem: str) -> list[pathlib.Path]:
    """Writes `OUT_DIR/STEM_0.png …` (the folder is created) and returns the paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = out / f"{stem}_{i}.png"
        img.save(path)
        paths.append(path)
    return paths

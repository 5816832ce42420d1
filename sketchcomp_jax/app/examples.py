"""Built-in example inputs for the notebook and the web UI: no files, no downloads.

A synthetic cartoon scene (`sketchcomp_jax.data.synthetic.render_scene`) with a box mask over its
lower middle (where the characters stand), the scene's own line art inside the box as the sketch, and
the same box as the self-reference crop (reference = that part of the source image).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from sketchcomp_jax.data.synthetic import render_scene


@dataclasses.dataclass
class ExampleInputs:
    image: Image.Image  # RGB, size×size
    mask: Image.Image  # L, 255 = fill
    sketch: Image.Image  # L, white strokes on black, inside the mask only
    reference_box: tuple[int, int, int, int]  # (x0, y0, x1, y1) in image pixels, exclusive ends


def example_inputs(size: int = 256, seed: int = 0, index: int = 0) -> ExampleInputs:
    """The example at `size` pixels (≥ 32). Deterministic in (size, seed, index)."""
    image, lines, _ = render_scene(seed, index, size)
    box = (int(0.3 * size), int(0.5 * size), int(0.7 * size), int(0.95 * size))
    x0, y0, x1, y1 = box
    mask = np.zeros((size, size), np.uint8)
    mask[y0:y1, x0:x1] = 255
    sketch = np.where(mask > 0, lines, 0).astype(np.uint8)
    return ExampleInputs(Image.fromarray(image, "RGB"), Image.fromarray(mask, "L"), Image.fromarray(sketch, "L"), box)

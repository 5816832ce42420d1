"""sketchcomp-jax: Paint-by-Sketch in JAX/Flax.

Conventions used throughout the package:
  * arrays are NHWC internally; NCHW exists only at the PyTorch boundary inside `weights/`;
  * `keep_mask`: 1 = keep the source pixel, 0 = hole to fill (the original's polarity);
  * sketches are in [-1, 1], white strokes (+1) on black (-1).
"""

__version__ = "0.1.0"

"""XDoG sketcher: binary white-on-black line drawings that follow the outlines of flat cartoons."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sketchcomp_jax.data.sketches import xdog_soft, xdog_sketch


def _cartoon(h: int = 160, w: int = 170):
    """Flat-colour shapes (one of them dark) on a light background, each with a 2-3 px black outline."""
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), np.uint8)
    img[:] = (235, 225, 200)
    r = np.hypot(yy - 70, xx - 65)
    img[r <= 40] = (210, 90, 90)
    rect = (yy >= 95) & (yy < 145) & (xx >= 85) & (xx < 150)
    img[rect] = (60, 140, 210)
    dark = (yy >= 20) & (yy < 50) & (xx >= 110) & (xx < 150)
    img[dark] = (40, 40, 60)
    outline = np.abs(r - 40) <= 1.0
    for m in (rect, dark):
        outline |= m & ~ndimage.binary_erosion(m, iterations=2)
    img[outline] = 0
    return img, outline


def test_xdog_follows_the_outline():
    img, outline = _cartoon()
    sketch = xdog_sketch(img)
    assert sketch.shape == img.shape[:2] and sketch.dtype == np.uint8
    assert set(np.unique(sketch)) == {0, 255}
    lines = sketch == 255
    assert lines.mean() < 0.1  # white lines on a black background, not the other way round
    # precision: line pixels lie on the outline (1 px slack for the blur)
    precision = np.count_nonzero(lines & ndimage.binary_dilation(outline, iterations=1)) / np.count_nonzero(lines)
    # recall: the outline is covered by the lines
    recall = np.count_nonzero(outline & lines) / np.count_nonzero(outline)
    assert precision >= 0.98, precision
    assert recall >= 0.95, recall


def test_xdog_colour_boundary_without_outline():
    img = np.empty((40, 60, 3), np.uint8)
    img[:] = (235, 225, 200)
    img[10:30, 15:45] = (60, 140, 210)
    lines = xdog_sketch(img) == 255
    boundary = np.zeros(img.shape[:2], bool)
    boundary[10:30, 15:45] = True
    boundary ^= ndimage.binary_erosion(boundary)
    assert np.count_nonzero(lines & boundary) >= 0.9 * np.count_nonzero(boundary)
    assert not lines[ndimage.binary_erosion(~ndimage.binary_dilation(boundary, iterations=3))].any()


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (30, 100, 200), (128, 128, 128)])
def test_constant_image_has_no_edges(colour):
    img = np.empty((48, 64, 3), np.uint8)
    img[:] = colour
    sketch = xdog_sketch(img)
    assert sketch.shape == (48, 64) and sketch.dtype == np.uint8
    assert not sketch.any()


def test_xdog_inputs_and_parameters():
    img, _ = _cartoon(64, 64)
    grey = (img.astype(np.float64) @ [0.299, 0.587, 0.114]).round().astype(np.uint8)
    assert xdog_sketch(grey).shape == (64, 64)
    np.testing.assert_array_equal(xdog_sketch(img), xdog_sketch(np.dstack([img, np.full((64, 64), 7, np.uint8)])))
    soft = xdog_soft(img)
    assert soft.min() >= 0.0 and soft.max() <= 1.0
    # larger sigma -> thicker lines
    assert np.count_nonzero(xdog_sketch(img, sigma=1.5)) > np.count_nonzero(xdog_sketch(img, sigma=0.6))
    with pytest.raises(ValueError):
        xdog_sketch(img, sigma=0)
    with pytest.raises(ValueError):
        xdog_sketch(np.zeros((2, 3, 4, 5), np.uint8))

"""Evaluation metrics on hand-made cases with known answers."""
import math

import numpy as np
import pytest

from sketchcomp_jax.eval import metrics as M


def _keep(h=16, w=16, hole=(4, 12, 4, 12)):
    keep = np.ones((h, w, 1), np.float32)
    y0, y1, x0, x1 = hole
    keep[y0:y1, x0:x1] = 0
    return keep


def test_identical_images_have_zero_error():
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 3))
    errs = M.reconstruction_errors(img, img, _keep())
    assert errs == {"l1": 0.0, "l2": 0.0, "l1_hole": 0.0, "l2_hole": 0.0}


def test_errors_of_a_known_difference_whole_and_hole():
    gt = np.zeros((16, 16, 3))
    pred = gt.copy()
    pred[4:12, 4:12] = 0.5  # wrong only inside the 8x8 hole
    errs = M.reconstruction_errors(pred, gt, _keep())
    assert errs["l1_hole"] == pytest.approx(0.5)
    assert errs["l2_hole"] == pytest.approx(0.25)
    assert errs["l1"] == pytest.approx(0.5 * 64 / 256)
    assert errs["l2"] == pytest.approx(0.25 * 64 / 256)


def test_no_hole_gives_nan_hole_errors_and_shape_errors_are_clear():
    img = np.zeros((8, 8, 3))
    errs = M.reconstruction_errors(img, img, np.ones((8, 8)))
    assert math.isnan(errs["l1_hole"]) and math.isnan(errs["l2_hole"])
    with pytest.raises(ValueError, match="one shape"):
        M.reconstruction_errors(np.zeros((8, 8, 3)), np.zeros((9, 8, 3)), np.ones((8, 8)))
    with pytest.raises(ValueError, match="mask"):
        M.reconstruction_errors(img, img, np.ones((4, 4)))


def _vertical_line(x, h=32, w=32, y0=4, y1=28):
    e = np.zeros((h, w), bool)
    e[y0:y1, x] = True
    return e


def test_perfect_sketch_match():
    line = _vertical_line(10)
    s = M.sketch_fidelity(line, line, tolerance=0)
    assert s == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "chamfer": 0.0}


@pytest.mark.parametrize("shift,tolerance,f1", [(1, 2.0, 1.0), (2, 2.0, 1.0), (3, 2.0, 0.0), (1, 0.0, 0.0)])
def test_shifted_sketch_has_the_known_f1_and_chamfer(shift, tolerance, f1):
    s = M.sketch_fidelity(_vertical_line(10 + shift), _vertical_line(10), tolerance=tolerance)
    assert s["f1"] == pytest.approx(f1)
    assert s["chamfer"] == pytest.approx(shift)  # every point of a shifted vertical line is `shift` px away


def test_partial_sketch_gives_known_precision_and_recall():
    target = _vertical_line(10) | _vertical_line(20)  # two strokes of 24 px
    pred = _vertical_line(10)  # only one drawn
    s = M.sketch_fidelity(pred, target, tolerance=1.0)
    assert s["precision"] == 1.0 and s["recall"] == pytest.approx(0.5)
    assert s["f1"] == pytest.approx(2 * 0.5 / 1.5)


def test_sketch_fidelity_counts_only_the_region_but_matches_edges_outside_it():
    target = _vertical_line(10)
    pred = _vertical_line(11)
    region = np.zeros((32, 32), bool)
    region[:, :11] = True  # the predicted line is just outside the region: nothing predicted inside
    s = M.sketch_fidelity(pred, target, region, tolerance=1.0)
    assert s["precision"] == 0.0 and s["recall"] == 1.0  # target in the region is matched by the outside line
    empty = M.sketch_fidelity(np.zeros((32, 32), bool), np.zeros((32, 32), bool), region)
    assert empty["f1"] == 1.0 and math.isnan(empty["chamfer"])
    missing = M.sketch_fidelity(np.zeros((32, 32), bool), target, region)
    assert missing["f1"] == 0.0 and missing["recall"] == 0.0 and math.isnan(missing["chamfer"])


def test_cosine_similarity_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    b = np.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
    np.testing.assert_allclose(M.cosine_similarity(a, b), [0.0, 1.0, -1.0], atol=1e-12)


def test_aggregate_skips_nan_and_spread():
    rows = [{"a": 1.0, "b": math.nan}, {"a": 3.0, "b": 2.0}]
    assert M.aggregate(rows) == {"a": 2.0, "b": 2.0}
    s = M.spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0) and s["n"] == 3

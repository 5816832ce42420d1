"""Per-image evaluation metrics as pure numpy functions.

Conventions: images are (H, W, 3) float in [0, 1] (or batches (N, H, W, 3)); `keep_mask` is (H, W) or
(H, W, 1) with 1 = keep, 0 = hole (the model's convention); edge maps are boolean (H, W), True = edge.

* reconstruction: L1 (mean |a − b|) and L2 (mean (a − b)², i.e. MSE) over all pixels and channels of the
  whole image, and over the hole's pixels only;
* sketch fidelity: precision / recall / F1 of edge pixels matched within a distance tolerance, and the
  symmetric chamfer distance, both restricted to the hole;
* cosine similarity of embedding vectors (CLIP-I is 100 × the cosine, as Paint-by-Example reports it).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
from scipy import ndimage


def _hole(keep_mask: np.ndarray) -> np.ndarray:
    m = np.asarray(keep_mask)
    if m.ndim == 3:
        m = m[..., 0]
    return m < 0.5


def reconstruction_errors(pred01: np.ndarray, gt01: np.ndarray, keep_mask: np.ndarray) -> dict[str, float]:
    """L1 / L2 of one (H, W, 3) image pair in [0, 1], over the whole image and over the hole.

    The hole values are NaN when the mask has no hole."""
    pred = np.asarray(pred01, np.float64)
    gt = np.asarray(gt01, np.float64)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"reconstruction_errors: expected two (H, W, 3) images of one shape, got {pred.shape} and {gt.shape}")
    hole = _hole(keep_mask)
    if hole.shape != pred.shape[:2]:
        raise ValueError(f"reconstruction_errors: mask {hole.shape} does not match the image {pred.shape[:2]}")
    diff = pred - gt
    out = {"l1": float(np.abs(diff).mean()), "l2": float((diff**2).mean())}
    if hole.any():
        d = diff[hole]
        out.update(l1_hole=float(np.abs(d).mean()), l2_hole=float((d**2).mean()))
    else:
        out.update(l1_hole=math.nan, l2_hole=math.nan)
    return out


def _distance_to(edges: np.ndarray) -> np.ndarray:
    """Euclidean distance of every pixel to the nearest True pixel of `edges` (inf when there is none)."""
    if not edges.any():
        return np.full(edges.shape, np.inf)
    return ndimage.distance_transform_edt(~edges)


def sketch_fidelity(pred_edges: np.ndarray, target_edges: np.ndarray, region: np.ndarray | None = None,
                    tolerance: float = 2.0) -> dict[str, float]:
    """How well the edges of a result follow the input sketch inside `region` (the hole).

    A predicted edge pixel is correct when a target edge pixel lies within `tolerance` pixels (Euclidean),
    and a target pixel is recalled when a predicted one lies within `tolerance`. Distances are measured to
    edges anywhere in the image, only the counted pixels are restricted to the region, so a stroke that
    continues just outside the hole is still matched.

    Returns precision, recall, f1 (1.0 for all three when neither map has edges in the region; 0 when
    only one has) and chamfer (the mean of the two directed mean nearest-edge distances, NaN when either
    map has no edges in the region).
    """
    pred = np.asarray(pred_edges, bool)
    target = np.asarray(target_edges, bool)
    if pred.shape != target.shape or pred.ndim != 2:
        raise ValueError(f"sketch_fidelity: expected two (H, W) edge maps of one shape, got {pred.shape} and {target.shape}")
    region = np.ones_like(pred) if region is None else np.asarray(region, bool)
    if region.ndim == 3:
        region = region[..., 0]
    pred_in, target_in = pred & region, target & region
    n_pred, n_target = int(pred_in.sum()), int(target_in.sum())
    if n_pred == 0 and n_target == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "chamfer": math.nan}
    to_target, to_pred = _distance_to(target), _distance_to(pred)
    precision = float((to_target[pred_in] <= tolerance).mean()) if n_pred else 0.0
    recall = float((to_pred[target_in] <= tolerance).mean()) if n_target else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    if n_pred and n_target:
        chamfer = 0.5 * (float(to_target[pred_in].mean()) + float(to_pred[target_in].mean()))
    else:
        chamfer = math.nan
    return {"precision": precision, "recall": recall, "f1": f1, "chamfer": chamfer}


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of (N, D) arrays, in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"cosine_similarity: shapes differ: {a.shape} vs {b.shape}")
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na * nb, 1e-12)


def mean_and_count(values: Iterable[float]) -> tuple[float, int]:
    """Mean over the finite values (NaN when there are none) and how many were finite."""
    arr = np.asarray([v for v in values], np.float64)
    finite = arr[np.isfinite(arr)]
    return (float(finite.mean()) if finite.size else math.nan), int(finite.size)


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Means of every metric over per-image rows (non-finite entries are left out of each mean)."""
    rows = list(rows)
    names = sorted({k for r in rows for k in r})
    return {name: mean_and_count(r[name] for r in rows if name in r)[0] for name in names}


class MetricSums:
    """Running means of per-image metrics: for each name the sum and count of its finite values, so that
    :meth:`means` equals :func:`aggregate` of all the rows without keeping them (float64 summation order
    aside: ~1e-16 relative). Accumulators of different hosts combine with :meth:`merge`."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, row: Mapping[str, float]) -> None:
        for name, value in row.items():
            self.sums.setdefault(name, 0.0)
            self.counts.setdefault(name, 0)
            if math.isfinite(value):
                self.sums[name] += float(value)
                self.counts[name] += 1

    def merge(self, other: "MetricSums") -> None:
        for name in other.sums:
            self.sums[name] = self.sums.get(name, 0.0) + other.sums[name]
            self.counts[name] = self.counts.get(name, 0) + other.counts[name]

    def means(self) -> dict[str, float]:
        """Sorted by name, NaN for a metric with no finite value (as :func:`aggregate`)."""
        return {n: (self.sums[n] / self.counts[n] if self.counts[n] else math.nan) for n in sorted(self.sums)}


def spread(values: Iterable[float]) -> dict[str, float]:
    """Mean, sample standard deviation, min and max of run-level figures (e.g. one value per seed)."""
    arr = np.asarray(list(values), np.float64)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }

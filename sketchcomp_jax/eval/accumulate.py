"""What a streaming evaluation keeps: running sums, never the images.

`EvalAccumulator` holds, for one process, the per-metric sums and counts (`metrics.MetricSums`), the
mean/covariance accumulators of the Inception and CLIP features of results and ground truths
(`fid.RunningStatistics`, O(D²) whatever the number of images), and a JSON-lines file of per-image rows
(`[position, row]` per line, in record order). Hosts save theirs as an `.npz` + rows file (`save`);
process 0 loads and merges them (`load`, `merge`) and writes the results JSON, streaming the rows of all
hosts merged by record position (`write_results`).
"""
from __future__ import annotations

import heapq
import json
import math
import os
import pathlib
from typing import Any, Iterable, Iterator

import numpy as np

from sketchcomp_jax.eval.fid import RunningStatistics
from sketchcomp_jax.eval.metrics import MetricSums
from sketchcomp_jax.paths import copy_file, is_remote

FEATURE_SETS = ("fid_results", "fid_gts", "clip_results", "clip_gts")


class EvalAccumulator:
    """One process's running state. `rows_path`: its JSON-lines file of per-image rows (created, truncated)."""

    def __init__(self, rows_path: str | os.PathLike, create: bool = True):
        self.rows_path = pathlib.Path(rows_path)
        self.metrics = MetricSums()
        self.features: dict[str, RunningStatistics] = {}
        self.generated = 0
        self.images = 0
        if create:
            self.rows_path.parent.mkdir(parents=True, exist_ok=True)
            self.rows_path.write_text("")

    def add_rows(self, positions: Iterable[int], rows: Iterable[dict[str, Any]]) -> None:
        """Appends per-image rows (`id` + metrics) and adds their metrics to the running means."""
        with open(self.rows_path, "a") as f:
            for position, row in zip(positions, rows):
                f.write(json.dumps([int(position), row]) + "\n")  # NaN is written as NaN: JSON-lines is ours
                self.metrics.add({k: v for k, v in row.items() if k != "id"})
                self.images += 1

    def add_features(self, name: str, features: np.ndarray) -> None:
        """Adds a batch `(B, D)` of feature vectors to the set `name` (one of FEATURE_SETS)."""
        if name not in self.features:
            self.features[name] = RunningStatistics(np.asarray(features).shape[1])
        self.features[name].update(features)

    def merge(self, other: "EvalAccumulator") -> None:
        self.metrics.merge(other.metrics)
        for name, stats in other.features.items():
            if name not in self.features:
                self.features[name] = RunningStatistics(stats.mean.shape[0])
            self.features[name].merge(stats)
        self.generated += other.generated
        self.images += other.images

    def save(self, path: str | os.PathLike) -> None:
        """Writes the running state (not the rows, already in `rows_path`) to the `.npz` `path`, atomically."""
        names = sorted(self.metrics.sums)
        arrays: dict[str, Any] = {
            "metric_names": np.asarray(names, dtype=str), "metric_sums": np.asarray([self.metrics.sums[n] for n in names]),
            "metric_counts": np.asarray([self.metrics.counts[n] for n in names], np.int64),
            "generated": np.asarray(self.generated), "images": np.asarray(self.images),
            "rows_path": np.asarray(str(self.rows_path)),
        }
        for name, stats in self.features.items():
            arrays.update(stats.to_arrays(name))
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EvalAccumulator":
        with np.load(path, allow_pickle=False) as z:
            out = cls(str(z["rows_path"]), create=False)
            for name, total, count in zip(z["metric_names"], z["metric_sums"], z["metric_counts"]):
                out.metrics.sums[str(name)] = float(total)
                out.metrics.counts[str(name)] = int(count)
            out.generated, out.images = int(z["generated"]), int(z["images"])
            for name in FEATURE_SETS:
                if f"{name}_n" in z.files:
                    out.features[name] = RunningStatistics.from_arrays(z, name)
        return out


def _rows(path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path) as f:
        for line in f:
            position, row = json.loads(line)
            yield position, row


def merged_rows(rows_paths: Iterable[str | os.PathLike]) -> Iterator[dict[str, Any]]:
    """Per-image rows of every process, in record order (each file is already in order)."""
    streams = [_rows(pathlib.Path(p)) for p in rows_paths]
    for _, row in heapq.merge(*streams, key=lambda item: item[0]):
        yield row


def finite(obj):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite(v) for v in obj]
    return obj


def write_results(out_path: str | os.PathLike, head: dict[str, Any], rows: Iterable[dict[str, Any]],
                  scratch: str | os.PathLike | None = None) -> None:
    """Writes `head` plus `"per_image": [rows…]` as one JSON object, row by row (never the whole list in
    memory), to a temporary sibling renamed into place. A remote `out_path` (gs://…) is written to a
    temporary file in the local directory `scratch` first, then uploaded as one object (atomic on GCS)."""
    remote = is_remote(out_path)
    if remote and scratch is None:
        raise ValueError("write_results: a remote out_path needs a local scratch directory")
    local = pathlib.Path(scratch) / "results.json" if remote else pathlib.Path(out_path)
    tmp = local.with_name(local.name + ".tmp")
    text = json.dumps(finite(head), indent=2)
    with open(tmp, "w") as f:
        f.write(text[:-2] + ',\n  "per_image": [')  # drop the closing "\n}"
        for i, row in enumerate(rows):
            f.write(("\n    " if i == 0 else ",\n    ") + json.dumps(finite(row)))
        f.write("\n  ]\n}\n")
    if remote:
        copy_file(tmp, out_path)
        tmp.unlink()
    else:
        os.replace(tmp, local)

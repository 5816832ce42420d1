"""Where training metrics go: `workdir/metrics.jsonl` and TensorBoard event files (no TensorFlow needed).

Only process 0 writes. TensorBoard events are written with tensorboardX (protobuf only), under
`workdir/tensorboard/`; `tensorboard --logdir WORKDIR/tensorboard` shows scalars and sample grids.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
from typing import Any, Mapping

import numpy as np

log = logging.getLogger(__name__)

# Row fields that are bookkeeping, not curves.
_NOT_SCALARS = ("step",)


class MetricsWriter:
    """Appends metric rows (dicts with a `step`) to metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboardX is a runtime dependency
                log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=30)

    def truncate_after(self, step: int) -> None:
        """Drops rows after `step` (they belong to steps a resumed run will redo)."""
        if not self.enabled or not self.jsonl_path.exists():
            return
        kept = []
        lines = self.jsonl_path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:  # a line torn by a kill mid-write (the last one) or a damaged file
                where = "its last line" if number == len(lines) else f"line {number}"
                log.warning("%s: dropped %s, which is not valid JSON (%s; a run killed while writing it)",
                            self.jsonl_path, where, e)
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                kept.append(line)
        # Write a sibling then rename: a kill during the rewrite leaves the old file or the new one, never half.
        tmp = self.jsonl_path.with_name(self.jsonl_path.name + ".tmp")
        tmp.write_text("".join(r + "\n" for r in kept))
        tmp.replace(self.jsonl_path)

    def write(self, rows: list[Mapping[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.jsonl_path, "a") as f:
            for row in rows:
                f.write(json.dumps(dict(row)) + "\n")
        if self._tb is not None:
            for row in rows:
                for name, value in row.items():
                    if name in _NOT_SCALARS or not isinstance(value, (int, float)) or not math.isfinite(value):
                        continue
                    self._tb.add_scalar(_tag(name), float(value), int(row["step"]))

    def image(self, name: str, image_hwc_uint8: np.ndarray, step: int) -> None:
        """A (H, W, 3) uint8 picture (e.g. the sample grid) at `step`."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, np.asarray(image_hwc_uint8), step, dataformats="HWC")

    def flush(self) -> None:
        """Makes TensorBoard events durable (metrics.jsonl rows are on disk as soon as `write` returns)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tag(name: str) -> str:
    """Groups curves in TensorBoard: eval_* under eval/, throughput under perf/, the rest under train/."""
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_"):]
    if name in ("seconds_per_step", "images_per_second", "mfu", "tflops_per_device"):
        return "perf/" + name
    return "train/" + name

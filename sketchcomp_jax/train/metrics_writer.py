"""Where training metrics go: `workdir/metrics.jsonl` and TensorBoard event files (no TensorFlow needed).

Only process 0 writes. TensorBoard events are written with tensorboardX (protobuf only), under
`workdir/tensorboard/`; `tensorboard --logdir WORKDIR/tensorboard` shows scalars and sample grids.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax import paths

log = logging.getLogger(__name__)

# A remote workdir's TensorBoard events are uploaded at least this often (and at every flush/close).
_UPLOAD_SECS = 120

# Row fields that are bookkeeping, not curves.
_NOT_SCALARS = ("step",)


class MetricsWriter:
    """Appends metric rows (dicts with a `step`) to metrics.jsonl and mirrors numbers to TensorBoard."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True, tensorboard: bool = True):
        self.workdir = paths.as_path(workdir)  # local or gs://
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._tb_upload = None  # (local event dir, remote dir) for a remote workdir
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboardX is a runtime dependency
                log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")
            else:
                tb_dir = self.workdir / "tensorboard"
                if paths.is_remote(tb_dir):
                    # Events go to a local file that is uploaded whole at each flush/close and every
                    # _UPLOAD_SECS (tensorboardX's own gs:// writer keeps the file in memory and uploads it
                    # again when garbage-collected, even after close).
                    import tempfile

                    local = pathlib.Path(tempfile.mkdtemp(prefix="sketchcomp-tensorboard-"))
                    self._tb_upload, self._uploaded_at = (local, tb_dir), time.time()
                    tb_dir = local
                self._tb = SummaryWriter(str(tb_dir), flush_secs=30)

    def truncate_after(self, step: int, redo_eval: bool = False) -> None:
        """Drops rows after `step` (they belong to steps a resumed run will redo), and with `redo_eval` the
        eval-loss row of `step` itself (a resumed run that recomputes it writes it again)."""
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
            if not isinstance(row, dict) or row.get("step", 0) > step:
                continue
            if redo_eval and row.get("step") == step and "eval_loss" in row:
                continue
            kept.append(line)
        # Write a sibling then rename: a kill during the rewrite leaves the old file or the new one, never half.
        paths.write_text_atomic(self.jsonl_path, "".join(r + "\n" for r in kept))

    def write(self, rows: list[Mapping[str, Any]]) -> None:
        if not self.enabled or not rows:
            return
        # Remote (gs://): objects cannot be appended to, so this rewrites the file (see paths.append_text).
        paths.append_text(self.jsonl_path, "".join(json.dumps(dict(row)) + "\n" for row in rows))
        if self._tb is not None:
            for row in rows:
                for name, value in row.items():
                    if name in _NOT_SCALARS or not isinstance(value, (int, float)) or not math.isfinite(value):
                        continue
                    self._tb.add_scalar(_tag(name), float(value), int(row["step"]))
            if self._tb_upload is not None and time.time() - self._uploaded_at > _UPLOAD_SECS:
                self.flush()

    def image(self, name: str, image_hwc_uint8: np.ndarray, step: int) -> None:
        """A (H, W, 3) uint8 picture (e.g. the sample grid) at `step`."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(name, np.asarray(image_hwc_uint8), step, dataformats="HWC")

    def flush(self) -> None:
        """Makes TensorBoard events durable (metrics.jsonl rows are on disk as soon as `write` returns)."""
        if self._tb is not None:
            self._tb.flush()
            self._upload_tensorboard()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
            self._upload_tensorboard()
            if self._tb_upload is not None:
                paths.rmtree(self._tb_upload[0])
                self._tb_upload = None

    def _upload_tensorboard(self) -> None:
        """Remote workdir: copies the local event files to WORKDIR/tensorboard/ (each upload is atomic)."""
        if self._tb_upload is None:
            return
        local, remote = self._tb_upload
        for f in sorted(local.iterdir()):
            paths.copy_file(f, remote / f.name)
        self._uploaded_at = time.time()


def _tag(name: str) -> str:
    """Groups curves in TensorBoard: eval_* under eval/, throughput under perf/, the rest under train/."""
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_"):]
    if name in ("seconds_per_step", "images_per_second", "mfu", "tflops_per_device"):
        return "perf/" + name
    return "train/" + name

"""The on-disk record format: a TFDS dataset in ArrayRecord format, written and read without TensorFlow.

Layout of a prepared dataset directory ``OUT`` (the TFDS "version directory" layout, so that
``tfds.builder_from_directory(OUT).as_data_source(split)`` reads it)::

    OUT/dataset_info.json, features.json, metadata.json           written last, when every shard is done
    OUT/sketchcomp-train.array_record-00000-of-000NN              one ArrayRecord file per shard
    OUT/sketchcomp-test.array_record-00000-of-000MM
    OUT/_prepare/plan.json                                       what is being prepared (fingerprint)
    OUT/_prepare/train-00000.done.json, ...                      one marker per finished shard
    OUT/_prepare/summary.json                                    counts, skipped files and reasons

One record per image (TFDS features, :func:`get_features`):

* ``image``: the encoded RGB image (the source file's own JPEG/PNG bytes when it needed no change,
  otherwise re-encoded: JPEG sources as JPEG q95, everything else as PNG);
* ``sketch``: the binarised sketch, a 1-channel PNG, 255 = line, 0 = background, same size as the image;
* ``tags``: UTF-8 text (Danbooru tags when a tags folder was given, else empty);
* ``id``: the image's path relative to the source folder (``synthetic/000012`` for the synthetic set);
* ``size``: int32 ``(height, width)`` of the stored image.

The dataset metadata (``metadata.json``) records which sketcher made the sketches and how the data was
prepared. Shards are written to a temporary name and renamed, then a done marker is written; an
interrupted run resumes by redoing only the shards without a valid marker (:class:`ShardedDatasetWriter`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import pathlib
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from sketchcomp_jax import paths

log = logging.getLogger(__name__)

DATASET_NAME = "sketchcomp"
FORMAT_VERSION = "1.0.0"
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
PROGRESS_DIR = "_prepare"
SPLITS = ("train", "test")

# tensorflow_datasets resolves many submodules lazily (etils ``LazyModule``, whose ``_module`` is a
# ``functools.cached_property``: in Python < 3.12 one lock shared by every instance, held while importing).
# Two threads touching tfds for the first time can then deadlock (one holds that lock and waits for a module
# import lock, the other holds the import lock and waits for that lock) -- seen with grain's read threads
# opening a RecordSource at once in a fresh worker process. Every tfds entry point here runs under this lock.
_TFDS_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------------------
# Features and (de)serialisation
# --------------------------------------------------------------------------------------------------


def get_features():
    """The TFDS ``FeaturesDict`` of one record (see the module docstring)."""
    with _TFDS_LOCK:
        return _features()


@functools.lru_cache(maxsize=None)
def _features():
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), doc="encoded RGB image (PNG or JPEG bytes)"),
        "sketch": tfds.features.Image(shape=(None, None, 1), encoding_format="png",
                                      doc="binarised sketch: 255 = line, 0 = background"),
        "tags": tfds.features.Text(doc="tags text (Danbooru-style), may be empty"),
        "id": tfds.features.Text(doc="image id: path relative to the source folder"),
        "size": tfds.features.Tensor(shape=(2,), dtype=np.int32, doc="(height, width)"),
    })


def serialize_record(*, image: bytes, sketch_png: bytes, tags: str, id: str, height: int, width: int) -> bytes:  # noqa: A002
    """One record as TFDS-serialised bytes (a ``tf.train.Example`` proto, built without TensorFlow)."""
    return get_features().serialize_example({
        "image": image,
        "sketch": sketch_png,
        "tags": tags,
        "id": id,
        "size": np.asarray([height, width], np.int32),
    })


def encode_png(array: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W) or (H, W, 3) → PNG bytes (fast compression; PNG is lossless at any level)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    """uint8 (H, W, 3) → JPEG bytes at ``quality`` without chroma subsampling (4:4:4): re-encoding line art
    with Pillow's default 4:2:0 smears colours across its edges (mean error 4 vs 1.5 grey levels at q95
    on a small cartoon) for ~30 % fewer bytes."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes → uint8 (H, W, 3) RGB."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)


def decode_sketch(data: bytes) -> np.ndarray:
    """Encoded sketch bytes → uint8 (H, W), 255 = line."""
    with Image.open(io.BytesIO(data)) as img:
        if img.mode != "L":
            img = img.convert("L")
        return np.asarray(img)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def load_builder(data_dir: str | os.PathLike):
    """``tfds.builder_from_directory`` with a clear error when the directory is not a finished dataset.
    ``data_dir`` may be remote (``gs://...``): the metadata is read there (reading records needs
    :func:`open_split`, which copies the split's shards to local disk)."""
    path = paths.as_path(data_dir)
    if not (path / "dataset_info.json").is_file():
        hint = ""
        if (path / PROGRESS_DIR / "plan.json").is_file():
            hint = " (a preparation was started there but did not finish: re-run the same command to resume)"
        raise FileNotFoundError(f"{path} is not a prepared dataset: no dataset_info.json{hint}")
    with _TFDS_LOCK:
        import tensorflow_datasets as tfds

        return tfds.builder_from_directory(os.fspath(path))


def dataset_metadata(data_dir: str | os.PathLike) -> dict:
    """The dataset's ``metadata.json`` (sketcher, preparation settings), {} if absent."""
    path = paths.as_path(data_dir) / "metadata.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def open_split(data_dir: str | os.PathLike, split: str, *, decode_images: bool = False):
    """The TFDS ``ArrayRecordDataSource`` of one split. With ``decode_images=False`` (the default) ``image``
    and ``sketch`` stay encoded bytes (decoding is left to the caller); otherwise TFDS decodes them to arrays.
    Thread-safe (see ``_TFDS_LOCK``): the first record is read under the lock, so that the lazy imports of
    the reading path also happen there. A remote ``data_dir`` (``gs://...``) is read from a local copy of
    the split (:func:`local_split_dir`)."""
    with _TFDS_LOCK:
        import tensorflow_datasets as tfds

        builder = load_builder(data_dir)
        if split not in builder.info.splits:
            raise ValueError(f"{data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}")
        if paths.is_remote(data_dir):
            builder = load_builder(local_split_dir(data_dir, split))
        decoders = None
        if not decode_images:
            decoders = {"image": tfds.decode.SkipDecoding(), "sketch": tfds.decode.SkipDecoding()}
        source = builder.as_data_source(split, decoders=decoders)
        if len(source):
            source[0]
        return source


def local_split_dir(data_dir: str | os.PathLike, split: str) -> pathlib.Path:
    """A local copy of a remote dataset's metadata and the shards of ``split`` (see ``paths.local_mirror``).

    The pip ``array_record`` reader opens local files only (``gs://`` paths fail or hang), so the shards a
    split reads are downloaded once per host into ``$SKETCHCOMP_CACHE_DIR`` and reused while their sizes
    match (a re-prepared dataset, with other metadata, gets a fresh copy)."""
    info_text = (paths.as_path(data_dir) / "dataset_info.json").read_text()
    info = json.loads(info_text)
    splits = {s["name"]: s for s in info.get("splits", [])}
    n = len(splits[split]["shardLengths"]) if split in splits else 0
    meta = ["dataset_info.json", "features.json", "metadata.json"]
    meta = [m for m in meta if (paths.as_path(data_dir) / m).is_file()]
    shards = [shard_filename(split, i, n) for i in range(n)]
    version = hashlib.sha256("".join([info_text] + [(paths.as_path(data_dir) / m).read_text()
                                                    for m in meta if m == "metadata.json"]).encode()).hexdigest()
    return paths.local_mirror(data_dir, meta + shards, refresh=meta, version=version)


# --------------------------------------------------------------------------------------------------
# Splits and shard names
# --------------------------------------------------------------------------------------------------


def split_of(item_id: str, *, seed: int, test_fraction: float) -> str:
    """'test' or 'train' from a seeded hash of the id: stable when files are added or removed."""
    digest = hashlib.sha256(f"{seed}\x00{item_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "test" if u < test_fraction else "train"


def shard_filename(split: str, index: int, num_shards: int) -> str:
    return f"{DATASET_NAME}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


def _file_template(data_dir: str):
    with _TFDS_LOCK:
        import tensorflow_datasets as tfds

        return tfds.core.ShardedFileTemplate(
            data_dir=data_dir, template=FILE_TEMPLATE, dataset_name=DATASET_NAME, filetype_suffix="array_record"
        )


def _atomic_write_text(path, text: str) -> None:
    paths.write_text_atomic(path, text)


def write_array_record(path, records: Iterable[bytes]) -> int:
    """Writes records to ``path`` atomically (temporary file, fsync, rename). Returns the file size. A remote
    ``path`` (``gs://...``) is written to a local temporary file (the array_record writer opens local files
    only) and uploaded as one object."""
    from array_record.python import array_record_module

    if paths.is_remote(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="sketchcomp-shard-") as tmp_dir:
            local = pathlib.Path(tmp_dir) / paths.as_path(path).name
            size = write_array_record(local, records)
            paths.copy_file(local, path)
        return size
    tmp = path.with_name(f".{path.name}.tmp")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1")
    try:
        for r in records:
            writer.write(r)
    finally:
        writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


# --------------------------------------------------------------------------------------------------
# The resumable sharded writer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ShardOutput:
    """What a shard-processing function returns: serialised records, skipped items as (id, reason)."""

    records: list[bytes]
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class WriteSummary:
    out_dir: str
    num_examples: dict[str, int]
    skipped: list[tuple[str, str]]
    shards_written: int
    shards_reused: int
    seconds: float

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skip_reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            key = reason.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts

    def text(self) -> str:
        lines = [f"dataset: {self.out_dir}"]
        for split, n in self.num_examples.items():
            lines.append(f"  {split}: {n} examples")
        lines.append(f"  shards written this run: {self.shards_written}, already done: {self.shards_reused}")
        lines.append(f"  skipped: {self.num_skipped}")
        for reason, n in sorted(self.skip_reasons().items()):
            lines.append(f"    {reason}: {n}")
        shown = self.skipped[:20]
        for item_id, reason in shown:
            lines.append(f"    - {item_id}: {reason}")
        if len(self.skipped) > len(shown):
            lines.append(f"    … and {len(self.skipped) - len(shown)} more (see {PROGRESS_DIR}/summary.json)")
        return "\n".join(lines)


def _size(path) -> int:
    """A file's size in bytes, local or remote."""
    return path.stat().st_size if isinstance(path, pathlib.Path) else path.stat().length


def _fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


class ShardedDatasetWriter:
    """Writes ``{split: [items]}`` as ArrayRecord shards of ``shard_size`` items each, resumably.

    ``fingerprint`` describes the preparation (settings and the ordered item ids); a directory holding a
    different preparation is refused unless ``overwrite``. A shard counts as done when its marker exists
    and its file has the size the marker recorded; other shards are (re)computed. The TFDS metadata is
    written after the last shard, so a directory with ``dataset_info.json`` is always complete.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        fingerprint: Mapping[str, Any],
        metadata: Mapping[str, Any],
        description: str,
        shard_size: int = 1000,
        overwrite: bool = False,
    ):
        if shard_size < 1:
            raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
        self.out_dir = paths.as_path(out_dir)
        self.fingerprint = dict(fingerprint)
        self.digest = _fingerprint_digest(self.fingerprint)
        self.metadata = dict(metadata)
        self.description = description
        self.shard_size = int(shard_size)
        self.overwrite = overwrite
        self.progress_dir = self.out_dir / PROGRESS_DIR

    # ---- plan ----------------------------------------------------------------------------------

    def _check_plan(self) -> None:
        plan_path = self.progress_dir / "plan.json"
        if plan_path.is_file():
            try:
                old = json.loads(plan_path.read_text())
            except ValueError:
                old = None
            if not isinstance(old, dict):
                # An unreadable plan (it is written atomically, so someone damaged it): write it again. The
                # shard markers carry the digest, so only shards of this very preparation are reused.
                log.warning("%s is unreadable; writing it again", plan_path)
                old = {"digest": self.digest, "shard_size": self.shard_size}
                _atomic_write_text(plan_path, json.dumps(
                    {"digest": self.digest, "shard_size": self.shard_size, "fingerprint": self.fingerprint,
                     "format_version": FORMAT_VERSION}, indent=1, default=str))
            if old.get("digest") == self.digest and old.get("shard_size") == self.shard_size:
                return
            if not self.overwrite:
                raise FileExistsError(
                    f"{self.out_dir} holds a different preparation (other settings or other input files); "
                    "use another output directory, or overwrite=True / --overwrite to start again"
                )
            self._wipe()
        elif self.out_dir.exists() and any(self.out_dir.iterdir()):
            managed = (self.out_dir / "dataset_info.json").exists() or any(self.out_dir.glob(f"{DATASET_NAME}-*"))
            if managed and not self.overwrite:
                raise FileExistsError(f"{self.out_dir} holds a dataset not made by this run; use --overwrite")
            if managed:
                self._wipe()
        self.progress_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(plan_path, json.dumps(
            {"digest": self.digest, "shard_size": self.shard_size, "fingerprint": self.fingerprint,
             "format_version": FORMAT_VERSION}, indent=1, default=str))

    def _wipe(self) -> None:
        log.warning("removing the previous preparation in %s", self.out_dir)
        self.discard()

    def discard(self) -> None:
        """Removes what a preparation put in ``out_dir`` (shards, TFDS metadata, progress markers), e.g. after a
        run in which every input was skipped; other files there are left alone."""
        for p in list(self.out_dir.glob(f"{DATASET_NAME}-*")) + list(self.out_dir.glob(f".{DATASET_NAME}-*")):
            p.unlink()
        for name in ("dataset_info.json", "features.json", "metadata.json"):
            if (self.out_dir / name).exists():
                (self.out_dir / name).unlink()
        paths.rmtree(self.progress_dir)

    def _marker(self, split: str, index: int):
        return self.progress_dir / f"{split}-{index:05d}.done.json"

    def _shard_done(self, split: str, index: int, num_shards: int) -> dict | None:
        marker = self._marker(split, index)
        if not marker.is_file():
            return None
        try:
            info = json.loads(marker.read_text())
        except ValueError:  # damaged: not JSON, or not even UTF-8
            return None
        if not isinstance(info, dict):
            return None
        path = self.out_dir / shard_filename(split, index, num_shards)
        if (info.get("digest") != self.digest or info.get("shard_size", self.shard_size) != self.shard_size
                or not path.is_file() or _size(path) != info.get("num_bytes")):
            return None
        return info

    def is_complete(self, split_items: Mapping[str, Sequence[Any]]) -> bool:
        if not (self.out_dir / "dataset_info.json").is_file():
            return False
        try:
            self._check_plan_readonly()
        except FileExistsError:
            return False
        for split, items in split_items.items():
            n = self._num_shards(len(items))
            if any(self._shard_done(split, i, n) is None for i in range(n)):
                return False
        return True

    def _check_plan_readonly(self) -> None:
        plan_path = self.progress_dir / "plan.json"
        try:
            digest = json.loads(plan_path.read_text()).get("digest") if plan_path.is_file() else None
        except (ValueError, AttributeError):
            digest = None
        if digest != self.digest:
            raise FileExistsError(str(self.out_dir))

    def _num_shards(self, n_items: int) -> int:
        return max(1, math.ceil(n_items / self.shard_size)) if n_items else 0

    # ---- run -----------------------------------------------------------------------------------

    def write(
        self,
        split_items: Mapping[str, Sequence[Any]],
        process: Callable[[str, Sequence[Any]], ShardOutput],
        *,
        progress: bool = True,
        progress_desc: str = "preparing",
        on_shard_done: Callable[[str, int, ShardOutput], None] | None = None,
    ) -> WriteSummary:
        """Processes every shard not yet done (``process(split, items) -> ShardOutput``), then writes the
        TFDS metadata and the summary. Returns the summary (of all shards, reused ones included)."""
        start = time.time()
        self._check_plan()
        total = sum(len(v) for v in split_items.values())
        jobs: list[tuple[str, int, int, Sequence[Any]]] = []
        done_items = 0
        reused = 0
        for split, items in split_items.items():
            n_shards = self._num_shards(len(items))
            for i in range(n_shards):
                chunk = items[i * self.shard_size:(i + 1) * self.shard_size]
                if self._shard_done(split, i, n_shards) is not None:
                    done_items += len(chunk)
                    reused += 1
                else:
                    jobs.append((split, i, n_shards, chunk))
        if reused:
            log.info("resuming: %d shard(s) already done, %d to do", reused, len(jobs))

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=done_items, desc=progress_desc, unit="img", dynamic_ncols=True)
        try:
            for split, i, n_shards, chunk in jobs:
                out = process(split, chunk)
                path = self.out_dir / shard_filename(split, i, n_shards)
                num_bytes = write_array_record(path, out.records)
                _atomic_write_text(self._marker(split, i), json.dumps({
                    "digest": self.digest, "shard_size": self.shard_size, "split": split, "shard": i, "num_shards": n_shards,
                    "num_examples": len(out.records), "num_bytes": num_bytes,
                    "skipped": [list(s) for s in out.skipped],
                }))
                if on_shard_done is not None:
                    on_shard_done(split, i, out)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return self._finalize(split_items, shards_written=len(jobs), shards_reused=reused, seconds=time.time() - start)

    def _finalize(self, split_items, *, shards_written: int, shards_reused: int, seconds: float) -> WriteSummary:
        import tensorflow_datasets as tfds

        num_examples: dict[str, int] = {}
        skipped: list[tuple[str, str]] = []
        split_infos = []
        template = _file_template(os.fspath(self.out_dir))
        for split, items in split_items.items():
            n_shards = self._num_shards(len(items))
            lengths, nbytes = [], 0
            for i in range(n_shards):
                info = self._shard_done(split, i, n_shards)
                if info is None:  # pragma: no cover - write() just made it
                    raise RuntimeError(f"shard {split} {i} is not done")
                lengths.append(int(info["num_examples"]))
                nbytes += int(info["num_bytes"])
                skipped.extend((str(a), str(b)) for a, b in info.get("skipped", []))
            num_examples[split] = sum(lengths)
            if num_examples[split] > 0:
                split_infos.append(tfds.core.SplitInfo(
                    name=split, shard_lengths=lengths, num_bytes=nbytes, filename_template=template))
        if not split_infos:
            raise ValueError(f"no usable images: every input was skipped ({len(skipped)} skipped)")
        metadata = dict(self.metadata)
        metadata.update({"num_examples": num_examples, "num_skipped": len(skipped), "format_version": FORMAT_VERSION})
        tfds.folder_dataset.write_metadata(
            data_dir=os.fspath(self.out_dir),
            features=get_features(),
            split_infos=split_infos,
            filename_template=template,
            check_data=False,  # reading back through tf.data would need TensorFlow
            description=self.description,
            metadata=tfds.core.MetadataDict(metadata),
        )
        summary = WriteSummary(
            out_dir=os.fspath(self.out_dir), num_examples=num_examples, skipped=skipped,
            shards_written=shards_written, shards_reused=shards_reused, seconds=seconds,
        )
        _atomic_write_text(self.progress_dir / "summary.json", json.dumps({
            "num_examples": num_examples, "num_skipped": len(skipped), "skip_reasons": summary.skip_reasons(),
            "skipped": [list(s) for s in skipped],
        }, indent=1))
        return summary

    def summary_if_complete(self, split_items: Mapping[str, Sequence[Any]]) -> WriteSummary | None:
        """The summary of an already complete preparation (no work), or None."""
        if not self.is_complete(split_items):
            return None
        num_examples, skipped = {}, []
        for split, items in split_items.items():
            n = self._num_shards(len(items))
            infos = [self._shard_done(split, i, n) for i in range(n)]
            num_examples[split] = sum(int(x["num_examples"]) for x in infos)
            for x in infos:
                skipped.extend((str(a), str(b)) for a, b in x.get("skipped", []))
        total_shards = sum(self._num_shards(len(v)) for v in split_items.values())
        return WriteSummary(os.fspath(self.out_dir), num_examples, skipped, 0, total_shards, 0.0)

"""The training / evaluation input pipeline: records → Paint-by-Sketch samples → sharded global batches.

grain: ``RecordSource`` (the prepared TFDS/ArrayRecord split, :mod:`sketchcomp_jax.data.records`) →
``IndexSampler`` (seeded global shuffle, per-process shard, epochs) → sample construction
(:class:`TrainSample`, a ``grain.transforms.RandomMap``, or :class:`EvalSample` with per-index fixed
randomness) → ``Batch`` → :func:`to_global_batch` (``jax.make_array_from_process_local_data``).

Sample construction follows the original step by step: :func:`sketchcomp_jax.data.sample_recipe.make_sample`
(the recipe) with the reference augmentation's OpenCV calls in :mod:`sketchcomp_jax.data.image_ops`; see
docs/data_pipeline.md. This module is the grain side: source, transforms, batching, loader, iterator state.

Batch (per process): ``gt`` (B,R,R,3) in [-1, 1]; ``keep_mask`` (B,R,R,1), 1 = keep, fractional on
resized edges as in the original; ``sketch`` (B,R,R,3) in [-1, 1], the full sketch (white = +1);
``reference`` (B,S,S,3) CLIP-normalised; ``tags`` (list of str, Danbooru spaces → commas as the
original) when the dataset has tags. All float32, NHWC.

Grain worker processes import this module: it loads no flax, no network and no torch (tests/test_architecture.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import threading
from typing import Any, Sequence

import grain
import numpy as np

from sketchcomp_jax.data import records
from sketchcomp_jax.data.sample_recipe import EVAL_SEED_SALT, make_sample

# --------------------------------------------------------------------------------------------------
# grain: source, transforms, batching, loader
# --------------------------------------------------------------------------------------------------


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, np.ndarray):
        v = v.item()
        return v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
    return str(v)


_OPEN_LOCK = threading.Lock()


class RecordSource:
    """A grain random-access source over one split of a prepared dataset. Elements are dicts with the
    encoded ``image`` and ``sketch`` bytes, ``tags`` and ``id`` text and the record ``index``. Picklable
    (worker processes re-open the files); its ``repr`` (checked by grain when restoring an iterator)
    names the split and the dataset's content, not its path, so a moved dataset still restores."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = os.fspath(data_dir)
        self.split = split
        from sketchcomp_jax.paths import as_path

        info_path = as_path(self.data_dir) / "dataset_info.json"  # local or gs:// (records are read locally)
        if not info_path.is_file():
            records.load_builder(self.data_dir)  # raises the helpful error
        info = json.loads(info_path.read_text())
        splits = {s["name"]: s for s in info.get("splits", [])}
        if split not in splits:
            raise ValueError(f"{self.data_dir} has no split {split!r}; it has {sorted(splits)}")
        self._lengths = [int(n) for n in splits[split]["shardLengths"]]
        self._num = sum(self._lengths)
        meta = records.dataset_metadata(self.data_dir)
        self.has_tags = bool(meta.get("has_tags", False))
        self.sketcher = meta.get("sketcher", "unknown")
        self._src = None

    def _open(self):
        if self._src is None:
            with _OPEN_LOCK:  # grain's read threads share the source: open the split once per process
                if self._src is None:
                    self._src = records.open_split(self.data_dir, self.split)
        return self._src

    def __len__(self) -> int:
        return self._num

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self._open()[int(index)]
        return {"image": r["image"], "sketch": r["sketch"], "tags": r["tags"], "id": r["id"], "index": int(index)}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_src"] = None
        return state

    def __repr__(self) -> str:
        return (f"RecordSource(split={self.split!r}, num_records={self._num}, shards={len(self._lengths)}, "
                f"sketcher={self.sketcher!r})")


@dataclasses.dataclass(frozen=True)
class SampleOptions:
    resolution: int
    reference_size: int
    arbitrary_mask_percent: float = 0.5
    with_tags: bool = False
    with_ids: bool = False
    tokenizer_dir: str | None = None  # text baseline: tags → `tokens` (77,) int32 with this CLIP tokenizer


@functools.lru_cache(maxsize=4)
def _tokenizer(folder: str):
    """One tokenizer per folder and process (grain workers load their own)."""
    from sketchcomp_jax.models.clip_tokenizer import CLIPTokenizer

    return CLIPTokenizer.from_folder(folder)


def _build(element: dict[str, Any], rng: np.random.Generator, opts: SampleOptions, augment: bool) -> dict[str, Any]:
    image = records.decode_image(element["image"])
    sketch = records.decode_sketch(element["sketch"])
    sample = make_sample(image, sketch, rng, resolution=opts.resolution, reference_size=opts.reference_size,
                         augment=augment, arbitrary_mask_percent=opts.arbitrary_mask_percent)
    if opts.with_tags or opts.tokenizer_dir:
        # The original reads the tag file and replaces spaces by commas (Danbooru tags use "_" inside tags).
        sample["tags"] = _text(element["tags"]).replace(" ", ",")
    if opts.tokenizer_dir:
        sample["tokens"] = _tokenizer(opts.tokenizer_dir)(sample["tags"])[0]
    if opts.with_ids:
        sample["id"] = _text(element["id"])
    return sample


class TrainSample(grain.transforms.RandomMap):
    """The training sample construction; grain hands it a per-element Philox generator derived from the
    loader seed and the element's position, so batches are identical for any ``worker_count``."""

    def __init__(self, opts: SampleOptions):
        self.opts = opts

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        return _build(element, rng, self.opts, augment=True)


class EvalSample(grain.transforms.Map):
    """The validation sample: RoI, mask and crop from a generator seeded by ``(seed, 77, record index)``
    (the original re-seeds ``random`` with ``index·77``), so each record always gets the same mask; the
    reference is only resized (as the original's validation transform)."""

    def __init__(self, opts: SampleOptions, seed: int):
        self.opts = opts
        self.seed = int(seed)

    def map(self, element: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, EVAL_SEED_SALT, int(element["index"])])
        return _build(element, rng, self.opts, augment=False)


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stacks array fields; text fields (tags, id) become lists."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], np.ndarray):
            out[key] = np.stack(values)
        else:
            out[key] = list(values)
    return out


class BatchAlignedSampler:
    """Wraps grain's ``IndexSampler`` so that batches do not depend on ``worker_count``.

    grain's ``DataLoader`` deals elements to its W workers round-robin (stream position ``l`` goes to
    worker ``l % W``), each worker batches its own elements, and batches are read from the workers in
    turn. This sampler reorders the stream so that worker ``w``'s ``k``-th batch holds exactly the
    elements of global batch ``k·W + w``, i.e. the batches (and their per-element random generators,
    which follow the element) come out identical to ``worker_count=0``. Finite streams are cut so that
    no worker forms a batch beyond the last one a single process would form (``drop_remainder``); with
    ``drop_remainder=False`` the final incomplete round keeps the plain order (only the last < W·B
    elements may then be grouped differently).
    """

    def __init__(self, inner: Any, *, shard_count: int, batch_size: int, worker_count: int, drop_remainder: bool):
        self.inner = inner
        self.shard_count = int(shard_count)
        self.batch_size = int(batch_size)
        self.workers = max(1, int(worker_count))
        self.drop_remainder = bool(drop_remainder)
        total = len(inner)
        self.infinite = total >= sys.maxsize // 2
        self._local_total = total // self.shard_count
        if self.infinite:
            self._local_len = self._local_total
        elif self.drop_remainder:
            nb = self._local_total // self.batch_size
            if nb == 0:
                self._local_len = 0
            else:
                last_round, last_worker = divmod(nb - 1, self.workers)
                self._local_len = ((last_round * self.batch_size + self.batch_size - 1) * self.workers
                                   + last_worker + 1)
        else:
            self._local_len = self._local_total
        round_size = self.workers * self.batch_size
        self._full_rounds_end = (self._local_total // round_size) * round_size

    def __len__(self) -> int:
        return sys.maxsize if self.infinite else self._local_len * self.shard_count

    def _position(self, local: int) -> int:
        if not self.infinite and not self.drop_remainder and local >= self._full_rounds_end:
            return local
        w, j = local % self.workers, local // self.workers
        k, offset = divmod(j, self.batch_size)
        position = (k * self.workers + w) * self.batch_size + offset
        if not self.infinite and position >= self._local_total:
            position %= max(self._local_total, 1)  # filler for a batch that will be dropped
        return position

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self):
            raise IndexError(f"sampler index {index} out of range [0, {len(self)})")
        local, shard = divmod(index, self.shard_count)
        return self.inner[self._position(local) * self.shard_count + shard]

    def __repr__(self) -> str:
        return (f"BatchAlignedSampler(batch_size={self.batch_size}, workers={self.workers}, "
                f"drop_remainder={self.drop_remainder}, inner={self.inner!r})")


def make_train_loader(
    data_dir: str,
    *,
    split: str = "train",
    resolution: int,
    reference_size: int,
    global_batch_size: int,
    seed: int = 0,
    worker_count: int = 0,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_epochs: int | None = None,
    eval_mode: bool = False,
    arbitrary_mask_percent: float = 0.5,
    drop_remainder: bool = True,
    with_ids: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
) -> grain.DataLoader:
    """A grain ``DataLoader`` of per-process batches of ``global_batch_size // shard_count`` samples.

    ``shard_index/shard_count`` default to ``jax.process_index()/jax.process_count()``; every shard gets a
    disjoint, equal-sized part of the split (the remainder is dropped). Training: seeded global shuffle
    (a new order every epoch), ``num_epochs=None`` repeats forever, random samples from grain's
    per-element generators. ``eval_mode``: no shuffle, one epoch unless ``num_epochs`` says otherwise,
    per-record fixed masks (:class:`EvalSample`); ``drop_remainder=False`` keeps a short last batch.
    Deterministic in ``seed`` for any ``worker_count``; iterators support ``get_state``/``set_state``
    and Orbax (:func:`checkpoint_save_args`). ``tokenizer_dir`` (the text baseline) adds ``tokens``: the
    record's tags through that CLIP tokenizer, (B, 77) int32.
    """
    if shard_index is None or shard_count is None:
        if (shard_index is None) != (shard_count is None):
            raise ValueError("give both shard_index and shard_count, or neither")
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
    if global_batch_size < 1 or global_batch_size % shard_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the shard count {shard_count}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    per_process = global_batch_size // shard_count
    source = RecordSource(data_dir, split)
    if len(source) // shard_count < 1:
        raise ValueError(f"split {split!r} has {len(source)} records: too few for {shard_count} shards")
    if drop_remainder and len(source) // shard_count < per_process:
        raise ValueError(f"split {split!r} has {len(source)} records: fewer than one batch of {per_process} per shard")
    if tokenizer_dir is not None:
        if not source.has_tags:
            raise ValueError(f"{data_dir} has no tags (prepared without --tags): the text baseline needs them")
        _tokenizer(os.fspath(tokenizer_dir))  # fail early on a bad folder
    opts = SampleOptions(resolution=int(resolution), reference_size=int(reference_size),
                         arbitrary_mask_percent=float(arbitrary_mask_percent), with_tags=source.has_tags,
                         with_ids=with_ids, tokenizer_dir=None if tokenizer_dir is None else os.fspath(tokenizer_dir))
    shard_options = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    if eval_mode and num_epochs is None:
        num_epochs = 1
    sampler = BatchAlignedSampler(
        grain.samplers.IndexSampler(num_records=len(source), shard_options=shard_options, shuffle=not eval_mode,
                                    num_epochs=num_epochs, seed=seed),
        shard_count=shard_count, batch_size=per_process, worker_count=worker_count, drop_remainder=drop_remainder,
    )
    transform = EvalSample(opts, seed) if eval_mode else TrainSample(opts)
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[transform, grain.transforms.Batch(per_process, drop_remainder=drop_remainder, batch_fn=collate)],
        worker_count=worker_count,
        worker_buffer_size=worker_buffer_size,
        shard_options=shard_options,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(per_process * 2, 16)),
    )


def to_global_batch(batch: dict, sharding) -> dict:
    """Per-process numpy batch → global ``jax.Array``s laid out by ``sharding`` (a ``NamedSharding`` whose
    first axis splits the batch), via ``jax.make_array_from_process_local_data``. Text fields are dropped."""
    import jax

    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


# --------------------------------------------------------------------------------------------------
# Iterator checkpointing
# --------------------------------------------------------------------------------------------------


def iterator_state(iterator: Any) -> str:
    """The JSON text of a grain ``DataLoaderIterator``'s position (store it anywhere)."""
    state = iterator.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state)


def restore_iterator_state(iterator: Any, state: str | bytes | dict) -> Any:
    """Moves ``iterator`` (from the same loader configuration) to a position saved by :func:`iterator_state`."""
    if isinstance(state, dict):
        state = json.dumps(state)
    if isinstance(state, str):
        state = state.encode()
    iterator.set_state(state)
    return iterator


def checkpoint_save_args(iterator: Any):
    """Orbax args saving the iterator inside a checkpoint, e.g.
    ``mgr.save(step, args=ocp.args.Composite(state=..., data=checkpoint_save_args(it)))``."""
    return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_args(iterator: Any):
    """Orbax args restoring into ``iterator`` (``mgr.restore(step, args=ocp.args.Composite(...,
    data=checkpoint_restore_args(it)))``)."""
    return grain.checkpoint.CheckpointRestore(iterator)

"""The evaluation protocol: reconstruction on a prepared dataset's test split with fixed masks per record.

For each of the first `num` records of `split` (in record order) the evaluation sample is built exactly as
the validation data of the original (`eval_mode`: RoI, Bézier/rectangle mask and square crop from a
generator seeded by the record index, reference only resized), the model fills the hole, and:

* L1 / L2 in [0, 1] over the whole image and over the hole (the result is the raw decoded image, no
  paste-back, as the original evaluates it);
* FID (Inception pool3, clean bicubic resize to 299) of the results against the ground-truth crops, when
  `inception_weights` is given;
* CLIP-I: 100 × cosine between the CLIP embedding of the result's hole crop (the hole's bounding box) and
  of the reference; CLIP-FD: Fréchet distance of CLIP embeddings of results vs ground truth;
* sketch fidelity: edges re-extracted from the result with the dataset's sketcher (XDoG for XDoG and
  synthetic sets, PiDiNet for PiDiNet sets when its weights are given), compared with the input sketch
  inside the hole (precision / recall / F1 within `edge_tolerance` px, chamfer distance). The same score
  of the ground truth image is reported as `gt_sketch_f1`, the ceiling the sketcher allows.

Generated images are cached as PNGs in `samples_dir/<record id>.png`: an interrupted evaluation resumes,
and images made elsewhere (e.g. by the original PyTorch code from the inputs written with
`export_inputs=True`) can be scored by putting them there. Metrics are always computed from the PNGs, so
fresh and resumed runs give identical numbers.

At scale the evaluation streams: each batch's images are written as they are generated and scored at
once; only running sums stay in memory (per-metric sums and counts, the mean/covariance accumulators of
the Inception and CLIP features — `eval/accumulate.py`), and per-image rows go to a JSON-lines file, so
host memory does not grow with the number of test images. Generation is data-parallel over this
process's devices (batch split over a mesh, parameters replicated on it); with several JAX processes
each takes every `process_count`-th batch, writes its partial sums beside `--out`, and process 0 merges
them into the results (the output folder must be shared by the hosts, e.g. `gs://` or NFS).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
from PIL import Image

from sketchcomp_jax import paths as P
from sketchcomp_jax.eval import metrics as M
from sketchcomp_jax.imageio import hole_bbox

log = logging.getLogger(__name__)

TABLE_ROWS = [  # (key, label, format)
    ("l1", "L1 (whole image)", "{:.4f}"),
    ("l2", "L2 (whole image)", "{:.4f}"),
    ("l1_hole", "L1 (hole)", "{:.4f}"),
    ("l2_hole", "L2 (hole)", "{:.4f}"),
    ("fid", "FID", "{:.3f}"),
    ("clip_i", "CLIP-I", "{:.2f}"),
    ("clip_fd", "CLIP-FD", "{:.3f}"),
    ("sketch_precision", "sketch precision", "{:.3f}"),
    ("sketch_recall", "sketch recall", "{:.3f}"),
    ("sketch_f1", "sketch F1", "{:.3f}"),
    ("sketch_chamfer", "sketch chamfer (px)", "{:.2f}"),
    ("gt_sketch_f1", "sketch F1 of the ground truth", "{:.3f}"),
]


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Sampling and metric settings of one evaluation (all recorded in the results)."""

    split: str = "test"
    num: int = 0  # 0 = the whole split
    batch_size: int = 4
    seed: int = 0
    sampler: str = "plms"
    steps: int = 50
    guidance_scale: float = 5.0
    sketch_drop_after: float = 1.0
    drop_value: float = 0.0
    vae_encode: str = "sample"
    edge_tolerance: float = 2.0
    data_seed: int = 0  # the eval masks' seed (the data pipeline's `seed`)
    attention: str | None = None  # attention backend; None = the model's config.attention
    model_step: int | None = None  # a training work dir's checkpoint step; None = the latest
    model_weights: str | None = None  # "raw" or "ema"; None = a run's raw weights / a model dir's own set


def _safe_name(record_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", record_id) or "record"


def _to_uint8(images01: np.ndarray) -> np.ndarray:
    return (255.0 * np.clip(images01, 0.0, 1.0)).astype(np.uint8)


def _unit(x: np.ndarray) -> np.ndarray:
    """[-1, 1] → [0, 1]."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


def _reference01(reference: np.ndarray) -> np.ndarray:
    from sketchcomp_jax.models.clip_vision import CLIP_MEAN, CLIP_STD

    return np.clip(reference * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32), 0.0, 1.0)


def batch_positions(num: int, batch_size: int, process_index: int = 0, process_count: int = 1) -> list[list[int]]:
    """Record positions of this process's batches: batch k holds `[k·B, (k+1)·B) ∩ [0, num)` and goes to
    process `k mod process_count` (record order, so every process gets a near-equal share)."""
    starts = range(process_index * batch_size, num, process_count * batch_size)
    return [list(range(a, min(a + batch_size, num))) for a in starts]


class _Records:
    """The records at `positions` of a split, as a grain random-access source (the element's `index` stays
    the record's own, which seeds its fixed evaluation mask)."""

    def __init__(self, source, positions: list[int]):
        self.source, self.positions = source, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.source[self.positions[i]]


def eval_batches(data_dir: str, settings: EvalSettings, resolution: int, reference_size: int,
                 tokenizer_dir: str | None = None, process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
    """This process's batches of the first `settings.num` records of the split, with fixed per-record masks
    (ids and record `position`s included; `tokens` of the tags too when a text model's `tokenizer_dir` is
    given). Decoding runs on grain read threads a couple of batches ahead; nothing else is held."""
    import grain

    from sketchcomp_jax.data.pipeline import EvalSample, RecordSource, SampleOptions, _tokenizer, collate

    source = RecordSource(data_dir, settings.split)
    total = len(source)
    num = total if settings.num <= 0 else min(settings.num, total)
    if settings.num > total:
        log.warning("split %r has only %d records (asked for %d)", settings.split, total, settings.num)
    if tokenizer_dir is not None:
        if not source.has_tags:
            raise ValueError(f"{data_dir} has no tags (prepared without --tags): the text baseline needs them")
        _tokenizer(os.fspath(tokenizer_dir))  # fail early on a bad folder
    batches = batch_positions(num, settings.batch_size, process_index, process_count)
    positions = [i for b in batches for i in b]
    if not positions:
        return
    opts = SampleOptions(resolution=int(resolution), reference_size=int(reference_size), with_tags=source.has_tags,
                         with_ids=True, tokenizer_dir=None if tokenizer_dir is None else os.fspath(tokenizer_dir))
    # Batches of this process's records: only the last one of the split can be short, so fixed-size
    # batching of the concatenated positions reproduces `batches` exactly.
    ds = (grain.MapDataset.source(_Records(source, positions)).map(EvalSample(opts, settings.data_seed))
          .batch(settings.batch_size, drop_remainder=False, batch_fn=collate))
    stream = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    for batch, pos in zip(stream, batches):
        yield batch | {"position": pos}


class _SketchExtractor:
    """Edges of result images with the dataset's sketcher (bool (H, W), True = edge)."""

    def __init__(self, dataset_sketcher: str, pidinet_weights: str | None):
        from sketchcomp_jax.data.prepare import make_sketcher

        if dataset_sketcher == "pidinet" and pidinet_weights:
            self.name = "pidinet"
        else:
            if dataset_sketcher == "pidinet":
                log.warning("the dataset's sketches were made with PiDiNet but no --pidinet_weights was given: "
                            "re-extracting edges with XDoG (sketch scores are then only indicative)")
            self.name = "xdog"
        self._sketcher = make_sketcher(self.name, pidinet_weights=pidinet_weights)

    def __call__(self, images_uint8: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(s) > 127 for s in self._sketcher(images_uint8)]


def evaluate(
    data_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    model_dir: str | os.PathLike | None = None,
    samples_dir: str | os.PathLike | None = None,
    settings: EvalSettings = EvalSettings(),
    inception_weights: str | None = None,
    clip_weights: str | None = None,
    pidinet_weights: str | None = None,
    export_inputs: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Runs the protocol; writes `out_path` (JSON, with every image's row under `per_image`) and the same name
    with `.md` (a table). Returns the results without `per_image` (read those from the file: they are not
    kept in memory). With several JAX processes every process must call it; process 0 writes the files.

    `model_dir` may be omitted when `samples_dir` already holds every result image (scoring only); the
    resolution is then taken from the images.
    """
    import jax

    from sketchcomp_jax.data.pipeline import RecordSource
    from sketchcomp_jax.eval.accumulate import EvalAccumulator, finite, merged_rows, write_results

    data_dir = os.fspath(data_dir)
    out_path = P.expand(out_path)
    if out_path.suffix != ".json":
        raise ValueError(f"--out must be a .json file, got {out_path}")
    if settings.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {settings.batch_size}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    samples = P.expand(samples_dir) if samples_dir else out_path.parent / (out_path.stem + "_samples")
    samples.mkdir(parents=True, exist_ok=True)
    source = RecordSource(data_dir, settings.split)
    process, processes = jax.process_index(), jax.process_count()
    mesh = _generation_mesh(settings.batch_size)

    model = _load_model(model_dir, mesh, settings) if model_dir else None
    resolution, reference_size = _sizes(model, samples)
    tokenizer_dir = None
    if model is not None and model[0].conditioning == "text":
        from sketchcomp_jax.weights.model_dir import model_tokenizer_dir

        tokenizer_dir = os.fspath(model_tokenizer_dir(model_dir, model[0]))
    generator = None

    # Each process's partial sums go to `partial_dir` beside --out for process 0 to merge. They are written
    # locally (appended per batch); with a remote --out they live in a local scratch folder and are
    # uploaded once at the end (object stores cannot append).
    partial_dir = out_path.with_name(out_path.stem + ".partial")
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="sketchcomp_eval_")) if P.is_remote(out_path) else partial_dir
    acc = EvalAccumulator(scratch / f"rows.{process}.jsonl")
    extractor = _SketchExtractor(source.sketcher, pidinet_weights)
    inception = None
    if inception_weights:
        from sketchcomp_jax.eval.fid import InceptionFeatures, load_inception

        inception = InceptionFeatures(load_inception(inception_weights))
    clip = _clip_encoder(clip_weights, model)
    n_total = settings.num if settings.num > 0 else len(source)
    bar = _progress(min(n_total, len(source)), progress and process == 0)
    for batch in eval_batches(data_dir, settings, resolution, reference_size, tokenizer_dir, process, processes):
        ids = [str(i) for i in batch["id"]]
        paths = [samples / f"{_safe_name(i)}.png" for i in ids]
        if export_inputs:
            _write_inputs(samples / "inputs", ids, batch)
        todo = [j for j, p in enumerate(paths) if not p.is_file()]
        if todo:
            if model is None:
                raise FileNotFoundError(
                    f"{paths[todo[0]]} is missing and no --model was given to generate it "
                    f"({len(todo)} of this batch's results are missing)"
                )
            if generator is None:
                generator = _make_generator(model, settings, mesh)
            images01 = generator(model[1], {k: v for k, v in batch.items() if isinstance(v, np.ndarray)},
                                 batch["position"], seed=settings.seed)
            for j in todo:  # written as soon as generated: an interrupted run resumes from here
                _atomic_png(paths[j], _to_uint8(images01[j]))
            acc.generated += len(todo)
        _score_batch(acc, batch, ids, paths, resolution, extractor, settings.edge_tolerance, inception, clip)
        bar.update(len(ids))
    bar.close()

    encoders: dict[str, str] = {"sketch": extractor.name}
    if inception is not None:
        encoders["fid"] = os.fspath(inception_weights)
    if clip is not None:
        encoders["clip"] = clip.name
    acc.save(scratch / f"stats.{process}.npz")
    partial_names = [lambda p: f"stats.{p}.npz", lambda p: f"rows.{p}.jsonl"]
    if scratch != partial_dir and processes > 1:
        for name in partial_names:
            P.copy_file(scratch / name(process), partial_dir / name(process))
    head = None
    if processes > 1:
        from sketchcomp_jax.parallel.mesh import barrier

        barrier("sketchcomp: evaluation partial sums written")
    if process == 0:
        if scratch != partial_dir:
            for p in range(1, processes):
                for name in partial_names:
                    P.copy_file(partial_dir / name(p), scratch / name(p))
        total = EvalAccumulator.load(scratch / "stats.0.npz")
        for p in range(1, processes):
            total.merge(EvalAccumulator.load(scratch / f"stats.{p}.npz"))
        if total.images == 0:
            raise ValueError(f"no records evaluated: split {settings.split!r} of {data_dir} is empty")
        head = {
            "model": os.fspath(model_dir) if model_dir else None,
            "data": data_dir,
            "samples": os.fspath(samples),
            "num_images": total.images,
            "generated_now": total.generated,
            "settings": dataclasses.asdict(settings),
            "encoders": encoders,
            "metrics": _summary(total),
        }
        rows = merged_rows(scratch / f"rows.{p}.jsonl" for p in range(processes))
        write_results(out_path, head, rows, scratch=scratch)
        P.write_text_atomic(out_path.with_suffix(".md"), markdown_table({"this run": head["metrics"]}, head))
        P.rmtree(partial_dir)
    if scratch != partial_dir:
        shutil.rmtree(scratch, ignore_errors=True)
    if processes > 1:
        barrier("sketchcomp: evaluation results written")
        if head is None:
            head = {k: v for k, v in json.loads(out_path.read_text()).items() if k != "per_image"}
    return finite(head)


def _score_batch(acc, batch, ids: list[str], paths: list, resolution: int, extractor,
                 tolerance: float, inception, clip) -> None:
    """Scores one batch from its PNGs into `acc`: per-image rows (L1/L2, sketch fidelity, CLIP-I) and the
    Inception / CLIP features of results and ground truths. Only this batch's images are in memory."""
    rows, results01, gts01, hole_crops, references01 = [], [], [], [], []
    for j, rid in enumerate(ids):
        with paths[j].open("rb") as f:
            result = np.asarray(Image.open(f).convert("RGB"))
        if result.shape[:2] != (resolution, resolution):
            raise ValueError(f"{paths[j]} is {result.shape[1]}x{result.shape[0]}, expected {resolution}x{resolution}")
        result01 = result.astype(np.float32) / 255.0
        gt01 = _unit(batch["gt"][j])
        keep = np.asarray(batch["keep_mask"][j])
        rows.append({"id": rid, **M.reconstruction_errors(result01, gt01, keep)})
        results01.append(result01)
        gts01.append(gt01)
        box = hole_bbox(keep, pad=0)
        hole_crops.append(result[box[1]:box[3], box[0]:box[2]] if box else result)
        references01.append(_reference01(np.asarray(batch["reference"][j])))
    _sketch_scores(extractor, rows, results01, gts01, batch, tolerance)
    if inception is not None:
        acc.add_features("fid_results", inception(np.stack(results01)))
        acc.add_features("fid_gts", inception(np.stack(gts01)))
    if clip is not None:
        clip_i = 100.0 * M.cosine_similarity(clip.embed(hole_crops), clip.embed(references01))
        for row, value in zip(rows, clip_i):
            row["clip_i"] = float(value)
        acc.add_features("clip_results", clip.embed(results01))
        acc.add_features("clip_gts", clip.embed(gts01))
    acc.add_rows(batch["position"], rows)


def _summary(acc) -> dict[str, float]:
    """The metrics of the merged accumulator: per-image means, then FID and CLIP-FD from the feature sums."""
    from sketchcomp_jax.eval.fid import frechet_distance

    summary = acc.metrics.means()
    if "fid_results" in acc.features:
        summary["fid"] = float(frechet_distance(*acc.features["fid_results"].statistics(),
                                                *acc.features["fid_gts"].statistics()))
    if "clip_results" in acc.features:
        summary["clip_fd"] = float(frechet_distance(*acc.features["clip_results"].statistics(),
                                                    *acc.features["clip_gts"].statistics()))
    return summary


def markdown_table(columns: dict[str, dict[str, float]], results: dict[str, Any] | None = None) -> str:
    """One column per run (e.g. per method), one row per metric present in any of them."""
    names = list(columns)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label, fmt in TABLE_ROWS:
        if not any(key in columns[n] for n in names):
            continue
        cells = []
        for n in names:
            v = columns[n].get(key)
            cells.append("–" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if results is not None:
        s = results["settings"]
        text += (f"\n{results['num_images']} images of split `{s['split']}` of `{results['data']}`; {s['sampler']} "
                 f"{s['steps']} steps, guidance {s['guidance_scale']}, sketch drop after {s['sketch_drop_after']}, "
                 f"seed {s['seed']}; encoders: {results['encoders']}\n")
    return text


# ------------------------------------------------------------------------------------------------ helpers


def _load_model(model_dir, mesh, settings: EvalSettings):
    """A model directory or a training work directory (its checkpoint `settings.model_step`, default the
    latest; parameters only, `settings.model_weights`), replicated over `mesh`: opened as every tool opens a model, with `SketchCompositionPipeline.from_pretrained`."""
    import jax

    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    pipe = SketchCompositionPipeline.from_pretrained(model_dir, step=settings.model_step,
                                                     weights=settings.model_weights, sharding=replicated)
    log.info("evaluating %s", pipe.description)
    return pipe.config, pipe.params


def fix_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Pins glibc's mmap threshold (`mallopt(M_MMAP_THRESHOLD)`): blocks of `threshold` bytes or more are
    mmap-ed and handed back to the OS when freed. By default glibc raises the threshold each time such a
    block is freed, after which the runtime's per-batch buffers come from the heap, which fragments: resident
    memory then creeps up batch after batch (measured: +24 MiB over 11 batches of the tiny model, flat with
    the threshold pinned). Returns False where there is no glibc (nothing changed)."""
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _generation_mesh(batch_size: int):
    """This host's devices that generate: the batch is split over them, the parameters replicated on them.
    As many local devices as divide the batch size (all of them when it is a multiple of their number), so
    no device computes padding."""
    import jax

    devices = jax.local_devices()
    used = math.gcd(batch_size, len(devices))
    if used < len(devices):
        log.info("--batch_size %d uses %d of this host's %d devices; a multiple of %d uses them all",
                 batch_size, used, len(devices), len(devices))
    return jax.sharding.Mesh(np.array(devices[:used]), ("data",))


def _sizes(model, samples) -> tuple[int, int]:
    if model is not None:
        return model[0].resolution, model[0].clip.image_size
    existing = sorted(p for p in samples.glob("*.png"))
    if not existing:
        raise FileNotFoundError(f"no --model given and {samples} holds no result PNGs to score")
    with existing[0].open("rb") as f, Image.open(f) as img:
        w, h = img.size
    if w != h:
        raise ValueError(f"{existing[0]} is {w}x{h}: results must be square, at the model resolution")
    return w, 224


def _make_generator(model, settings: EvalSettings, mesh):
    from sketchcomp_jax.generation import BatchGenerator
    from sketchcomp_jax.models.config import build_networks

    config = model[0]
    return BatchGenerator(config, build_networks(config, attention=settings.attention), sampler=settings.sampler, steps=settings.steps,
                          guidance_scale=settings.guidance_scale, sketch_drop_after=settings.sketch_drop_after,
                          drop_value=settings.drop_value, vae_encode=settings.vae_encode, mesh=mesh)


def _clip_encoder(clip_weights, model):
    from sketchcomp_jax.eval.clip_score import load_clip_encoder, model_clip_encoder

    if clip_weights:
        return load_clip_encoder(clip_weights)
    if model is not None and "clip" in model[1]["conditioner"]:
        import jax

        # One copy on one device (the encoder is cheap next to sampling), not the copies replicated over the mesh.
        clip = jax.device_put(jax.device_get(model[1]["conditioner"]["clip"]), jax.local_devices()[0])
        return model_clip_encoder(model[0], {"conditioner": {"clip": clip}})
    log.warning("no CLIP image encoder (give --clip_weights): CLIP-I and CLIP-FD are skipped")
    return None


def _sketch_scores(extractor: _SketchExtractor, rows, results01, gts01, batch, tolerance: float) -> None:
    pred_edges = extractor([_to_uint8(r) for r in results01])
    gt_edges = extractor([_to_uint8(g) for g in gts01])
    for j, row in enumerate(rows):
        target = np.asarray(batch["sketch"][j])[..., 0] > 0
        hole = np.asarray(batch["keep_mask"][j])[..., 0] < 0.5
        s = M.sketch_fidelity(pred_edges[j], target, hole, tolerance)
        row.update({f"sketch_{k}": v for k, v in s.items()})
        row["gt_sketch_f1"] = M.sketch_fidelity(gt_edges[j], target, hole, tolerance)["f1"]


def _write_inputs(folder, ids: list[str], batch) -> None:
    """The exact evaluation inputs as the original's files expect them: image, mask (white = fill), sketch
    (white on black, full image), reference (the un-augmented crop at the CLIP size)."""
    for j, rid in enumerate(ids):
        d = folder / _safe_name(rid)
        if (d / "reference.png").is_file():
            continue
        d.mkdir(parents=True, exist_ok=True)
        _atomic_png(d / "image.png", _to_uint8(_unit(batch["gt"][j])))
        _atomic_png(d / "mask.png", _to_uint8(1.0 - np.asarray(batch["keep_mask"][j])[..., 0]))
        _atomic_png(d / "sketch.png", _to_uint8(_unit(batch["sketch"][j])))
        _atomic_png(d / "reference.png", _to_uint8(_reference01(np.asarray(batch["reference"][j]))))


def _atomic_png(path, array_uint8: np.ndarray) -> None:
    """A PNG that a kill never leaves half-written (local or gs://)."""
    buffer = io.BytesIO()
    Image.fromarray(array_uint8).save(buffer, format="PNG")
    P.write_bytes_atomic(path, buffer.getvalue())


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="img", disable=not enabled)

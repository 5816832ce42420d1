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
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from typing import Any, Iterator

import numpy as np
from PIL import Image

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


def eval_batches(data_dir: str, settings: EvalSettings, resolution: int, reference_size: int,
                 tokenizer_dir: str | None = None) -> Iterator[dict]:
    """Batches of the first `settings.num` records of the split with fixed per-record masks (ids included;
    `tokens` of the tags too when a text model's `tokenizer_dir` is given)."""
    from sketchcomp_jax.data.pipeline import RecordSource, make_train_loader

    total = len(RecordSource(data_dir, settings.split))
    num = total if settings.num <= 0 else min(settings.num, total)
    if settings.num > total:
        log.warning("split %r has only %d records (asked for %d)", settings.split, total, settings.num)
    loader = make_train_loader(
        data_dir, split=settings.split, resolution=resolution, reference_size=reference_size,
        global_batch_size=settings.batch_size, seed=settings.data_seed, shard_index=0, shard_count=1,
        eval_mode=True, num_epochs=1, drop_remainder=False, with_ids=True, tokenizer_dir=tokenizer_dir,
    )
    seen = 0
    for batch in loader:
        take = min(len(batch["id"]), num - seen)
        if take <= 0:
            break
        yield {k: v[:take] for k, v in batch.items()} | {"position": list(range(seen, seen + take))}
        seen += take
        if seen >= num:
            break


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
    """Runs the protocol; writes `out_path` (JSON) and the same name with `.md` (a table). Returns the results.

    `model_dir` may be omitted when `samples_dir` already holds every result image (scoring only); the
    resolution is then taken from the images.
    """
    from sketchcomp_jax.data.pipeline import RecordSource

    data_dir = os.fspath(data_dir)
    out_path = pathlib.Path(out_path)
    if out_path.suffix != ".json":
        raise ValueError(f"--out must be a .json file, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    samples = pathlib.Path(samples_dir) if samples_dir else out_path.with_suffix("").parent / (out_path.stem + "_samples")
    samples.mkdir(parents=True, exist_ok=True)
    source = RecordSource(data_dir, settings.split)

    model = _load_model(model_dir) if model_dir else None
    resolution, reference_size = _sizes(model, samples)
    tokenizer_dir = None
    if model is not None and model[0].conditioning == "text":
        from sketchcomp_jax.weights.model_dir import model_tokenizer_dir

        tokenizer_dir = os.fspath(model_tokenizer_dir(model_dir, model[0]))
    generator = None

    per_image: list[dict[str, Any]] = []
    results01, gts01, hole_crops, references01 = [], [], [], []
    extractor = _SketchExtractor(source.sketcher, pidinet_weights)
    n_total = settings.num if settings.num > 0 else len(source)
    bar = _progress(min(n_total, len(source)), progress)
    generated = 0
    for batch in eval_batches(data_dir, settings, resolution, reference_size, tokenizer_dir):
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
                generator = _make_generator(model, settings)
            images01 = generator(model[1], {k: v for k, v in batch.items() if isinstance(v, np.ndarray)},
                                 batch["position"], seed=settings.seed)
            for j in todo:
                _atomic_png(paths[j], _to_uint8(images01[j]))
            generated += len(todo)
        for j, rid in enumerate(ids):
            result = np.asarray(Image.open(paths[j]).convert("RGB"))
            if result.shape[:2] != (resolution, resolution):
                raise ValueError(f"{paths[j]} is {result.shape[1]}x{result.shape[0]}, expected {resolution}x{resolution}")
            result01 = result.astype(np.float32) / 255.0
            gt01 = _unit(batch["gt"][j])
            keep = np.asarray(batch["keep_mask"][j])
            row: dict[str, Any] = {"id": rid, **M.reconstruction_errors(result01, gt01, keep)}
            per_image.append(row)
            results01.append(result01)
            gts01.append(gt01)
            box = hole_bbox(keep, pad=0)
            hole_crops.append(result[box[1]:box[3], box[0]:box[2]] if box else result)
            references01.append(_reference01(np.asarray(batch["reference"][j])))
        _sketch_scores(extractor, per_image[-len(ids):], results01[-len(ids):], gts01[-len(ids):],
                       batch, settings.edge_tolerance)
        bar.update(len(ids))
    bar.close()
    if not per_image:
        raise ValueError(f"no records evaluated: split {settings.split!r} of {data_dir} is empty")

    summary = M.aggregate({k: v for k, v in r.items() if k != "id"} for r in per_image)
    encoders: dict[str, str] = {"sketch": extractor.name}
    if inception_weights:
        from sketchcomp_jax.eval.fid import InceptionFeatures, fid_from_features, load_inception

        inception = InceptionFeatures(load_inception(inception_weights))
        summary["fid"] = float(fid_from_features(inception(np.stack(results01)), inception(np.stack(gts01))))
        encoders["fid"] = os.fspath(inception_weights)
    clip = _clip_encoder(clip_weights, model)
    if clip is not None:
        from sketchcomp_jax.eval.fid import fid_from_features

        emb_hole, emb_ref = clip.embed(hole_crops), clip.embed(references01)
        clip_i = 100.0 * M.cosine_similarity(emb_hole, emb_ref)
        for row, value in zip(per_image, clip_i):
            row["clip_i"] = float(value)
        summary["clip_i"] = float(np.mean(clip_i))
        summary["clip_fd"] = float(fid_from_features(clip.embed(results01), clip.embed(gts01)))
        encoders["clip"] = clip.name
    results = {
        "model": os.fspath(model_dir) if model_dir else None,
        "data": data_dir,
        "samples": os.fspath(samples),
        "num_images": len(per_image),
        "generated_now": generated,
        "settings": dataclasses.asdict(settings),
        "encoders": encoders,
        "metrics": summary,
        "per_image": per_image,
    }
    out_path.write_text(json.dumps(_finite(results), indent=2))
    out_path.with_suffix(".md").write_text(markdown_table({"this run": summary}, results))
    return results


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


def _load_model(model_dir):
    """A model directory or a training work directory (its latest checkpoint)."""
    from sketchcomp_jax.model_source import load_model_source

    source = load_model_source(model_dir)
    log.info("evaluating %s", source.description)
    return source.config, source.params


def _sizes(model, samples: pathlib.Path) -> tuple[int, int]:
    if model is not None:
        return model[0].resolution, model[0].clip.image_size
    existing = sorted(p for p in samples.glob("*.png"))
    if not existing:
        raise FileNotFoundError(f"no --model given and {samples} holds no result PNGs to score")
    with Image.open(existing[0]) as img:
        w, h = img.size
    if w != h:
        raise ValueError(f"{existing[0]} is {w}x{h}: results must be square, at the model resolution")
    return w, 224


def _make_generator(model, settings: EvalSettings):
    from sketchcomp_jax.generation import BatchGenerator
    from sketchcomp_jax.models.config import build_networks

    config = model[0]
    return BatchGenerator(config, build_networks(config), sampler=settings.sampler, steps=settings.steps,
                          guidance_scale=settings.guidance_scale, sketch_drop_after=settings.sketch_drop_after,
                          drop_value=settings.drop_value, vae_encode=settings.vae_encode)


def _clip_encoder(clip_weights, model):
    from sketchcomp_jax.eval.clip_score import load_clip_encoder, model_clip_encoder

    if clip_weights:
        return load_clip_encoder(clip_weights)
    if model is not None and "clip" in model[1]["conditioner"]:
        return model_clip_encoder(model[0], model[1])
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


def _write_inputs(folder: pathlib.Path, ids: list[str], batch) -> None:
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


def _atomic_png(path: pathlib.Path, array_uint8: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array_uint8).save(tmp, format="PNG")
    os.replace(tmp, path)


def _finite(obj):
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluate", unit="img", disable=not enabled)

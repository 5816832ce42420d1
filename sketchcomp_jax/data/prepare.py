"""Image folder → sketch → TFDS/ArrayRecord dataset (the library behind ``launch/prepare_data.py``).

For every image file under ``images_dir`` (recursive; .jpg/.jpeg/.png/.webp/.bmp, any case):

1. decode it; corrupt, truncated, empty and non-image files are skipped with a reason and counted;
2. convert it to 8-bit RGB: grayscale/palette/CMYK/YCbCr/LAB/HSV via PIL, 16-bit by scaling (÷257),
   transparency (RGBA, LA, palette with transparency) composited over white;
3. only when asked (``max_side`` > 0; the default 0 keeps the native size, as the original, whose pixel
   constants assume it), cap its longer side at ``max_side`` (Lanczos; JPEGs are first decoded at a reduced
   scale with ``draft`` when they are more than twice too large);
4. make its sketch: PiDiNet (the paper's sketches, :class:`~sketchcomp_jax.data.sketches.PidinetSketcher`,
   binarised at 0.6) or XDoG (no weights), at the stored image's resolution;
5. store the image bytes untouched when they need no change (a JPEG or an 8-bit RGB PNG below the cap),
   else re-encoded (JPEG sources as JPEG q95, others as PNG), with the sketch PNG, the tags text
   (``tags_dir/<relative path>.txt`` or ``tags_dir/<stem>.txt``), the size and the id (relative path).

The split is ``test`` when a seeded hash of the id falls below ``test_fraction`` (stable when files are
added). Shards and resume: see :class:`sketchcomp_jax.data.records.ShardedDatasetWriter`. ``save_sketches``
also writes every sketch as a PNG (:func:`sketch_filenames`); sketches of shards finished by an earlier run
are exported from the records.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import logging
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from sketchcomp_jax.data import records
from sketchcomp_jax.paths import as_path, rmtree

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# Pillow refuses images above 2 × MAX_IMAGE_PIXELS (≈179 MP) as decompression bombs; prepare raises the
# limit so that big scans are capped instead of skipped, and still refuses absurd sizes.
MAX_PIXELS = 512 * 1024 * 1024


@dataclasses.dataclass
class LoadedImage:
    id: str
    rgb: np.ndarray  # (H, W, 3) uint8
    encoded: bytes  # what goes into the record
    tags: str
    notes: tuple[str, ...] = ()  # conversions applied ("converted from CMYK", "capped 4000→1024", ...)


class SkipImage(Exception):
    """An input that cannot be used; the message is the reason recorded in the summary."""


# --------------------------------------------------------------------------------------------------
# Listing and loading
# --------------------------------------------------------------------------------------------------


def list_images(images_dir: str | os.PathLike) -> tuple[list[tuple[str, pathlib.Path]], int]:
    """Sorted ``(id, path)`` for every image file under ``images_dir``; and how many other files were ignored."""
    root = pathlib.Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"--images {root} is not a directory")
    found, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = pathlib.Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda t: t[0])
    return found, ignored


def read_tags(tags_dir: pathlib.Path | None, item_id: str) -> str:
    if tags_dir is None:
        return ""
    rel = pathlib.PurePosixPath(item_id)
    for candidate in (tags_dir / rel.with_suffix(".txt"), tags_dir / (rel.stem + ".txt")):
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8", errors="replace").strip()
    return ""


def sketch_filenames(ids: Iterable[str]) -> dict[str, str]:
    """Where ``--save_sketches`` puts each id's sketch, relative to its folder: the id with its extension
    replaced by ``.png`` (``sub/a.jpg`` → ``sub/a.png``), or, when two ids would share that name (``a.jpg``
    and ``a.png``), the whole id plus ``.png`` (``a.jpg.png``, ``a.png.png``) so that none overwrites another."""
    base = {i: pathlib.PurePosixPath(i).with_suffix(".png").as_posix() for i in ids}
    counts = collections.Counter(base.values())
    return {i: (b if counts[b] == 1 else i + ".png") for i, b in base.items()}


def export_sketches(data_dir: str | os.PathLike, target: str | os.PathLike, *,
                    names: Mapping[str, str] | None = None, only_missing: bool = True) -> int:
    """Writes the stored sketch PNG of every record of the prepared dataset ``data_dir`` under ``target``
    (file names from ``names``, default :func:`sketch_filenames` of the dataset's ids); with
    ``only_missing`` existing files are left alone. Returns the number of files written."""
    builder = records.load_builder(data_dir)
    sources = [records.open_split(data_dir, split) for split in builder.info.splits]
    if names is None:
        names = sketch_filenames(_text(src[i]["id"]) for src in sources for i in range(len(src)))
    root = pathlib.Path(target)
    written = 0
    for src in sources:
        for i in range(len(src)):
            record = src[i]
            path = root / names[_text(record["id"])]
            if only_missing and path.is_file():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(record["sketch"])
            written += 1
    return written


def _text(value) -> str:
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return data[24]
    return None


def to_rgb8(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Any PIL mode → 8-bit RGB, with notes on what was converted."""
    notes: list[str] = []
    mode = img.mode
    if mode == "RGB":
        return img, notes
    notes.append(f"mode {mode}")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            arr = arr / 257.0 if arr.max(initial=0) > 255 else arr
        else:  # float images: [0, 1] or [0, 255]
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8)).convert("RGB"), notes
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append("alpha over white")
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    return img.convert("RGB"), notes


@contextlib.contextmanager
def _pixel_limit(limit: int):
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image_for_record(path: pathlib.Path, item_id: str, *, max_side: int, tags: str = "") -> LoadedImage:
    """Decodes, converts and caps one image; raises :class:`SkipImage` with the reason for unusable files."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SkipImage(f"unreadable file: {e}") from None
    if not data:
        raise SkipImage("empty file")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # would silently accept truncated files
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; prepare refuses to run with it")
    notes: list[str] = []
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        w0, h0 = img.size
        if w0 < 1 or h0 < 1:
            raise SkipImage("empty image (zero size)")
        if max_side and fmt == "JPEG" and max(w0, h0) > 2 * max_side:
            # decode at 1/2, 1/4 or 1/8 scale, never below the cap
            scale = max_side / max(w0, h0)
            img.draft(img.mode, (int(np.ceil(w0 * scale)), int(np.ceil(h0 * scale))))
        img.load()
    except SkipImage:
        raise
    except Image.DecompressionBombError as e:
        raise SkipImage(f"too large: {e}") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise SkipImage(f"corrupt or truncated: {e}") from None
    if getattr(img, "n_frames", 1) > 1:
        notes.append("first frame")
    try:
        rgb_img, conv = to_rgb8(img)
    except (OSError, ValueError) as e:
        raise SkipImage(f"corrupt or truncated: {e}") from None
    notes += conv
    w, h = rgb_img.size
    if img.size != (w0, h0):
        notes.append(f"draft {w0}x{h0}→{img.size[0]}x{img.size[1]}")
    if max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        new = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
        rgb_img = rgb_img.resize(new, Image.LANCZOS)
        notes.append(f"capped {max(w0, h0)}→{max(new)}")
    rgb = np.asarray(rgb_img, dtype=np.uint8)
    untouched = not notes and (fmt == "JPEG" or (fmt == "PNG" and _png_bit_depth(data) == 8))
    if untouched:
        encoded = data
    elif fmt in ("JPEG", "MPO"):
        encoded = records.encode_jpeg(rgb)
        # The sketch must be made from the pixels training will decode (as the original ran PiDiNet on
        # the stored file), not from the pre-compression ones.
        rgb = records.decode_image(encoded)
    else:
        encoded = records.encode_png(rgb)
    return LoadedImage(item_id, rgb, encoded, tags, tuple(notes))


# --------------------------------------------------------------------------------------------------
# Sketchers
# --------------------------------------------------------------------------------------------------


class XdogSketcher:
    """Per-image XDoG (no weights), thread-safe."""

    name = "xdog"

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        from sketchcomp_jax.data.sketches import xdog_sketch

        return [xdog_sketch(im) for im in images]

    batched = False


class BucketedPidinet:
    """PiDiNet on a list of images of any sizes; images of one (run) shape go as one batch of up to
    ``batch_size``.

    ``bucket`` 0 (the default) or 1 runs every image at its native size: the original's sketches, one
    compilation per distinct size. ``bucket`` > 1 is an approximate speed option: each image is padded
    (reflect, bottom/right) to a multiple of ``bucket`` pixels so that few shapes are compiled, and the
    sketch is cropped back. That cannot be exact: the padded pixels reach the kept ones through the
    zero-padded convolutions' receptive field, and a new size moves the max-pool grid and the bilinear
    up-sampling coordinates of the side outputs (1–3 % of pixels differ on photos, more on small images)."""

    name = "pidinet"
    batched = True

    def __init__(self, weights: str | os.PathLike, *, bucket: int = 64, batch_size: int = 8):
        from sketchcomp_jax.data.sketches import PidinetSketcher

        self.sketcher = PidinetSketcher.from_checkpoint(weights)
        if int(bucket) < 0:
            raise ValueError(f"pidinet_bucket must be ≥ 0 (0 = native size, exact), got {bucket}")
        self.bucket = max(1, int(bucket))
        self.batch_size = max(1, int(batch_size))
        if self.bucket > 1:
            log.warning("PiDiNet bucket %d: images are padded, so sketches differ from the original's on a few "
                        "%% of pixels (--pidinet_bucket 0 runs the native sizes exactly)", self.bucket)

    def _padded_shape(self, h: int, w: int) -> tuple[int, int]:
        b = self.bucket
        return (-(-h // b) * b, -(-w // b) * b)

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(images):
            groups.setdefault(self._padded_shape(*im.shape[:2]), []).append(i)
        for (ph, pw), idx in groups.items():
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                batch = np.stack([self._pad(images[i], ph, pw) for i in part])
                sk = self.sketcher.sketch(batch)
                for j, i in enumerate(part):
                    h, w = images[i].shape[:2]
                    out[i] = np.ascontiguousarray(sk[j, :h, :w])
        return out  # type: ignore[return-value]

    @staticmethod
    def _pad(im: np.ndarray, ph: int, pw: int) -> np.ndarray:
        h, w = im.shape[:2]
        if (h, w) == (ph, pw):
            return im
        mode = "reflect" if h > 1 and w > 1 and ph - h < h and pw - w < w else "edge"
        return np.pad(im, ((0, ph - h), (0, pw - w), (0, 0)), mode=mode)


def make_sketcher(name: str, *, pidinet_weights: str | None = None, pidinet_bucket: int = 0,
                  batch_size: int = 8):
    if name == "xdog":
        return XdogSketcher()
    if name == "pidinet":
        if not pidinet_weights:
            raise ValueError("--sketcher pidinet needs --pidinet_weights (table5_pidinet.pth or a .safetensors copy)")
        return BucketedPidinet(pidinet_weights, bucket=pidinet_bucket, batch_size=batch_size)
    raise ValueError(f"unknown sketcher {name!r}; use 'pidinet' or 'xdog'")


# --------------------------------------------------------------------------------------------------
# The whole preparation
# --------------------------------------------------------------------------------------------------


def prepare_dataset(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tags_dir: str | os.PathLike | None = None,
    sketcher: str = "xdog",
    pidinet_weights: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_side: int = 0,
    save_sketches: str | os.PathLike | None = None,
    shard_size: int = 1000,
    num_threads: int | None = None,
    pidinet_bucket: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    sketch_fn: Callable[[Sequence[np.ndarray]], list[np.ndarray]] | None = None,
) -> records.WriteSummary:
    """Prepares ``images_dir`` into a dataset at ``out_dir`` and returns the summary (see module docstring).

    Re-running the same command resumes an interrupted run (finished shards are kept); a complete dataset
    is left untouched. ``sketch_fn`` (a list of uint8 RGB images → list of uint8 {0,255} sketches) replaces
    the named sketcher, e.g. in tests.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_side < 0:
        raise ValueError(f"max_side must be ≥ 0 (0 = no cap), got {max_side}")
    if pidinet_bucket < 0:
        raise ValueError(f"pidinet_bucket must be ≥ 0 (0 = native size, exact), got {pidinet_bucket}")
    images_root = pathlib.Path(images_dir)
    tags_root = pathlib.Path(tags_dir) if tags_dir else None
    if tags_root is not None and not tags_root.is_dir():
        raise FileNotFoundError(f"--tags {tags_root} is not a directory")
    files, ignored = list_images(images_root)
    if not files:
        raise ValueError(f"no images (.jpg/.jpeg/.png/.webp/.bmp) under {images_root}")
    if ignored:
        log.info("ignoring %d file(s) without an image extension", ignored)
    paths = dict(files)
    split_items: dict[str, list[str]] = {s: [] for s in records.SPLITS}
    for item_id, _ in files:
        split_items[records.split_of(item_id, seed=seed, test_fraction=test_fraction)].append(item_id)

    sketcher_name = sketcher if sketch_fn is None else getattr(sketch_fn, "name", "custom")
    settings = {
        "kind": "folder", "images_dir": os.fspath(images_root.resolve()), "ids_sha256": _ids_digest(files),
        "tags_dir": os.fspath(tags_root.resolve()) if tags_root else None, "sketcher": sketcher_name,
        "pidinet_bucket": pidinet_bucket if sketcher_name == "pidinet" else None,
        "test_fraction": test_fraction, "seed": seed, "max_side": max_side,
    }
    metadata = {
        "sketcher": sketcher_name,
        "sketcher_details": _sketcher_details(sketcher_name, pidinet_weights, pidinet_bucket),
        "has_tags": tags_root is not None, "source": os.fspath(images_root.resolve()),
        "settings": settings, "num_ignored_files": ignored, "created_by": "sketchcomp_jax.data.prepare",
    }
    writer = records.ShardedDatasetWriter(
        out_dir, fingerprint=settings, metadata=metadata, shard_size=shard_size, overwrite=overwrite,
        description=f"sketchcomp-jax dataset prepared from {images_root} with {sketcher_name} sketches",
    )
    sketch_root = pathlib.Path(save_sketches) if save_sketches else None
    sketch_names = sketch_filenames(paths)
    done = writer.summary_if_complete(split_items)
    if done is not None:
        log.info("%s is already complete", out_dir)
        if sketch_root is not None:  # e.g. --save_sketches added after the data was prepared
            n = export_sketches(out_dir, sketch_root, names=sketch_names)
            log.info("wrote %d missing sketch PNG(s) under %s", n, sketch_root)
        return done

    fn = sketch_fn if sketch_fn is not None else make_sketcher(
        sketcher, pidinet_weights=pidinet_weights, pidinet_bucket=pidinet_bucket, batch_size=batch_size)
    batched = getattr(fn, "batched", True)
    threads = num_threads or min(8, os.cpu_count() or 1)

    def load(item_id: str):
        try:
            return load_image_for_record(paths[item_id], item_id, max_side=max_side,
                                         tags=read_tags(tags_root, item_id))
        except SkipImage as e:
            return (item_id, str(e))

    def finish(loaded: LoadedImage, sketch: np.ndarray) -> bytes:
        sketch = np.asarray(sketch, np.uint8)
        if sketch.shape != loaded.rgb.shape[:2]:
            raise ValueError(f"sketcher returned {sketch.shape} for an image of {loaded.rgb.shape[:2]}")
        png = records.encode_png(sketch)
        if sketch_root is not None:
            target = sketch_root / sketch_names[loaded.id]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(png)
        h, w = loaded.rgb.shape[:2]
        return records.serialize_record(image=loaded.encoded, sketch_png=png, tags=loaded.tags, id=loaded.id,
                                        height=h, width=w)

    pool = ThreadPoolExecutor(max_workers=threads)
    num_usable = [0]  # images this run made records of
    skipped_now: list[tuple[str, str]] = []

    def process(split: str, ids: Sequence[str]) -> records.ShardOutput:
        results = list(pool.map(load, ids))
        good = [r for r in results if isinstance(r, LoadedImage)]
        skipped = [r for r in results if not isinstance(r, LoadedImage)]
        for item_id, reason in skipped:  # the summary lists them all; here for --verbosity=1 / debugging
            log.debug("skipping %s: %s", item_id, reason)
        num_usable[0] += len(good)
        skipped_now.extend(skipped)
        if batched:
            sketches = fn([g.rgb for g in good]) if good else []
            recs = list(pool.map(finish, good, sketches))
        else:
            recs = list(pool.map(lambda g: finish(g, fn([g.rgb])[0]), good))
        return records.ShardOutput(recs, skipped)

    out_existed = as_path(out_dir).exists()
    try:
        with _pixel_limit(MAX_PIXELS):
            summary = writer.write(split_items, process, progress=progress, progress_desc=f"prepare ({sketcher_name})")
    except ValueError:
        if num_usable[0] or not skipped_now:
            raise
        # Every input was skipped: nothing worth resuming, so --out is left as it was (no progress folder,
        # no empty shards; a folder this run created is removed).
        writer.discard()
        if not out_existed:
            rmtree(out_dir)
        first = "; ".join(f"{i}: {r}" for i, r in skipped_now[:3]) + ("; …" if len(skipped_now) > 3 else "")
        raise ValueError(f"no usable images under {images_root}: all {len(skipped_now)} were skipped ({first}); "
                         f"nothing was written to {out_dir}") from None
    finally:
        pool.shutdown()
    if sketch_root is not None and summary.shards_reused:  # shards done by an earlier run wrote theirs then, or not
        export_sketches(out_dir, sketch_root, names=sketch_names)
    return summary


def _ids_digest(files: Sequence[tuple[str, pathlib.Path]]) -> str:
    import hashlib

    h = hashlib.sha256()
    for item_id, _ in files:
        h.update(item_id.encode())
        h.update(b"\x00")
    return h.hexdigest()


def _sketcher_details(name: str, weights: str | None, bucket: int) -> str:
    if name == "pidinet":
        return (f"PiDiNet carv4 + CDCM + CSAM (table5), weights {os.path.basename(weights or '')}, "
                f"binarised at uint8 > 153; "
                + ("native size (exact)" if bucket <= 1 else f"padded to multiples of {bucket} px (approximate)"))
    if name == "xdog":
        return "XDoG (sketchcomp_jax.data.sketches.xdog_sketch defaults), 255 = line"
    return name

"""Dataset preparation (``sketchcomp_jax.data.prepare`` / ``launch/prepare_data.py``) on a folder of awkward files.

One module-scoped preparation of a nested folder holding corrupt, truncated and non-image files, every
odd PIL mode, oversized images and tags (XDoG sketches, tiny images) serves most tests; resume, PiDiNet
and the CLI have their own small runs. The sample construction and the grain loader's properties are
tested in tests/test_data_pipeline.py; here we only check that prepared data loads.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from sketchcomp_jax.data import records
from sketchcomp_jax.data.prepare import XdogSketcher, prepare_dataset, sketch_filenames
from sketchcomp_jax.data.sketches import xdog_sketch
from sketchcomp_jax.data.synthetic import render_scene

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED, TEST_FRACTION, MAX_SIDE = 5, 0.3, 64


def _scene(i: int, h: int, w: int) -> np.ndarray:
    """A cartoon (flat colours, black outlines) cut to (h, w): real-ish content with lines for XDoG."""
    image = render_scene(11, i, max(h, w, 64))[0]
    return np.ascontiguousarray(image[:h, :w])


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


GOOD = ["big.jpg", "big.png", "dup/a.jpg", "dup/a.png", "gray.png", "rgb.jpg", "sub/b.bmp", "sub/cmyk.jpg",
        "sub/deep/g16.png", "sub/deep/w.webp", "sub/pal.png", "sub/pal_t.png", "sub/rgba.png"]
BAD = {"bad.jpg": "corrupt or truncated", "trunc.png": "corrupt or truncated",
       "text.png": "not an image (unidentified format)", "empty.jpg": "empty file"}


def _make_folder(root: pathlib.Path, order: int = 1) -> dict[str, np.ndarray]:
    """Writes the awkward folder (files created in ``order``: 1 sorted, -1 reversed); returns the RGB
    pixels each good file should give after conversion (before any capping), for the exact ones."""
    rng = np.random.default_rng(0)
    g16 = rng.integers(0, 65536, (30, 36), dtype=np.uint16)
    rgba = np.dstack([_scene(3, 30, 30), rng.integers(0, 256, (30, 30), dtype=np.uint8)])
    pal_src = Image.fromarray(_scene(4, 40, 50)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    writers = {
        "rgb.jpg": lambda p: Image.fromarray(_scene(0, 40, 56)).save(p, quality=90),
        "gray.png": lambda p: Image.fromarray(_scene(1, 40, 50)).convert("L").save(p),
        "sub/pal.png": lambda p: pal_src.save(p),
        "sub/pal_t.png": lambda p: pal_src.save(p, transparency=0),
        "sub/rgba.png": lambda p: Image.fromarray(rgba, "RGBA").save(p),
        "sub/cmyk.jpg": lambda p: Image.fromarray(_scene(5, 36, 44)).convert("CMYK").save(p, quality=95),
        "sub/deep/g16.png": lambda p: Image.fromarray(g16).save(p),
        "sub/deep/w.webp": lambda p: Image.fromarray(_scene(6, 32, 48)).save(p, quality=80),
        "sub/b.bmp": lambda p: Image.fromarray(_scene(7, 28, 40)).save(p),
        "big.png": lambda p: Image.fromarray(np.tile(_scene(8, 50, 50), (3, 4, 1))).save(p),  # 150 × 200
        "big.jpg": lambda p: Image.fromarray(np.tile(_scene(9, 60, 60), (5, 7, 1))).save(p, quality=90),  # 300 × 420
        "dup/a.jpg": lambda p: Image.fromarray(_scene(10, 40, 40)).save(p, quality=90),
        "dup/a.png": lambda p: Image.fromarray(_scene(12, 40, 40)).save(p),
        "bad.jpg": lambda p: p.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes()),
        "trunc.png": lambda p: p.write_bytes(_png_bytes(_scene(2, 64, 64))[:-300]),
        "text.png": lambda p: p.write_text("hello, I am not an image\n"),
        "empty.jpg": lambda p: p.write_bytes(b""),
        "notes.txt": lambda p: p.write_text("no image extension: ignored"),
    }
    for name in sorted(writers, reverse=order < 0):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writers[name](path)
    composite = Image.alpha_composite(Image.new("RGBA", (30, 30), (255, 255, 255, 255)), Image.fromarray(rgba, "RGBA"))
    return {
        "gray.png": np.repeat(np.asarray(Image.open(root / "gray.png"))[..., None], 3, axis=-1),
        "sub/pal.png": np.asarray(pal_src.convert("RGB")),
        "sub/deep/g16.png": np.repeat(np.rint(g16 / 257.0).astype(np.uint8)[..., None], 3, axis=-1),
        "sub/deep/w.webp": np.asarray(Image.open(root / "sub/deep/w.webp").convert("RGB")),
        "sub/b.bmp": _scene(7, 28, 40),
        "dup/a.png": _scene(12, 40, 40),
        "sub/rgba.png": np.asarray(composite.convert("RGB")),
    }


def _make_tags(root: pathlib.Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "rgb.txt").write_text("1girl solo smile\n")
    (root / "sub" / "pal.txt").write_text("red_hair long_hair")  # by relative path
    (root / "g16.txt").write_text("greyscale")  # by stem (no sub/deep/ folder)


def _read_all(out) -> dict[str, dict]:
    """{id: record} with decoded ``image`` and ``sketch`` arrays and the ``split`` it is in."""
    builder = records.load_builder(out)
    result = {}
    for split in builder.info.splits:
        src = records.open_split(out, split)
        for i in range(len(src)):
            r = src[i]
            item_id = r["id"].decode()
            assert item_id not in result
            result[item_id] = {
                "split": split, "image_bytes": r["image"], "image": records.decode_image(r["image"]),
                "sketch_bytes": r["sketch"], "sketch": records.decode_sketch(r["sketch"]),
                "tags": r["tags"].decode(), "size": tuple(int(v) for v in r["size"]),
            }
    return result


def _shard_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).glob("sketchcomp-*"))}


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    base = tmp_path_factory.mktemp("odd")
    expected = _make_folder(base / "images")
    _make_tags(base / "tags")
    summary = prepare_dataset(
        base / "images", base / "out", tags_dir=base / "tags", sketcher="xdog", max_side=MAX_SIDE, seed=SEED,
        test_fraction=TEST_FRACTION, shard_size=4, save_sketches=base / "sketches", progress=False,
    )
    return {"base": base, "out": base / "out", "summary": summary, "expected": expected, "records": _read_all(base / "out")}


# --------------------------------------------------------------------------------------------------
# the awkward folder
# --------------------------------------------------------------------------------------------------


def test_skips_are_counted_and_named(odd):
    summary, recs = odd["summary"], odd["records"]
    assert sorted(recs) == sorted(GOOD)
    assert sum(summary.num_examples.values()) == len(GOOD)
    assert summary.num_skipped == len(BAD)
    assert {i: r.split(":")[0] for i, r in summary.skipped} == BAD
    assert summary.skip_reasons() == {"corrupt or truncated": 2, "not an image (unidentified format)": 1, "empty file": 1}
    text = summary.text()
    for name in BAD:
        assert f"- {name}: " in text
    on_disk = json.loads((odd["out"] / "_prepare" / "summary.json").read_text())
    assert on_disk["num_skipped"] == len(BAD) and sorted(i for i, _ in on_disk["skipped"]) == sorted(BAD)
    meta = records.dataset_metadata(odd["out"])
    assert meta["num_skipped"] == len(BAD) and meta["num_ignored_files"] == 1  # notes.txt
    assert meta["num_examples"] == summary.num_examples


def test_odd_modes_become_rgb(odd):
    recs, expected = odd["records"], odd["expected"]
    for item_id, r in recs.items():
        assert r["image"].dtype == np.uint8 and r["image"].ndim == 3 and r["image"].shape[2] == 3, item_id
        assert Image.open(io.BytesIO(r["image_bytes"])).mode == "RGB", item_id
        assert r["size"] == r["image"].shape[:2] == r["sketch"].shape, item_id
    for item_id, pixels in expected.items():  # stored as PNG, so exact (±1 where PIL composites alpha)
        got = recs[item_id]["image"].astype(int)
        assert got.shape == pixels.shape, item_id
        assert np.abs(got - pixels).max() <= (1 if item_id == "sub/rgba.png" else 0), item_id
    # palette transparency (index 0) is composited over white, the rest keeps the palette colours
    pal = Image.open(odd["base"] / "images" / "sub/pal_t.png")
    transparent = np.asarray(pal) == 0
    assert transparent.any() and (recs["sub/pal_t.png"]["image"][transparent] == 255).all()
    np.testing.assert_array_equal(recs["sub/pal_t.png"]["image"][~transparent], expected["sub/pal.png"][~transparent])
    # CMYK JPEG: PIL's conversion, re-encoded as JPEG (q95, 4:4:4: mean error 1.5 here, 4.1 with 4:2:0)
    cmyk = np.asarray(Image.open(odd["base"] / "images" / "sub/cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(recs["sub/cmyk.jpg"]["image"].astype(int) - cmyk).mean() < 2.5
    assert recs["sub/cmyk.jpg"]["image_bytes"][:2] == b"\xff\xd8"
    # a JPEG that needed no change is stored byte for byte
    assert recs["rgb.jpg"]["image_bytes"] == (odd["base"] / "images" / "rgb.jpg").read_bytes()


def test_oversized_images_are_capped(odd):
    recs = odd["records"]
    assert recs["big.png"]["size"] == (48, 64)  # 150 × 200 → longer side 64
    assert recs["big.jpg"]["size"] == (46, 64)  # 300 × 420: JPEG draft decode, then Lanczos to 64
    ref = np.asarray(Image.open(odd["base"] / "images" / "big.png").resize((64, 48), Image.LANCZOS))
    np.testing.assert_array_equal(recs["big.png"]["image"], ref)
    assert all(max(r["size"]) <= MAX_SIDE for r in recs.values())


def test_sketch_is_xdog_of_the_stored_pixels(odd):
    """Also for re-encoded JPEGs (CMYK, capped): the sketch is made from what training will decode."""
    for item_id, r in odd["records"].items():
        np.testing.assert_array_equal(r["sketch"], xdog_sketch(r["image"]), err_msg=item_id)
        assert set(np.unique(r["sketch"])) <= {0, 255}
    assert sum(int((r["sketch"] == 255).sum()) for r in odd["records"].values()) > 500
    meta = records.dataset_metadata(odd["out"])
    assert meta["sketcher"] == "xdog" and "XDoG" in meta["sketcher_details"]


def test_tags(odd):
    recs = odd["records"]
    assert recs["rgb.jpg"]["tags"] == "1girl solo smile"
    assert recs["sub/pal.png"]["tags"] == "red_hair long_hair"
    assert recs["sub/deep/g16.png"]["tags"] == "greyscale"
    assert all(recs[i]["tags"] == "" for i in recs if i not in ("rgb.jpg", "sub/pal.png", "sub/deep/g16.png"))
    assert records.dataset_metadata(odd["out"])["has_tags"] is True


def test_split_is_the_seeded_hash_of_the_id(odd):
    for item_id, r in odd["records"].items():
        digest = hashlib.sha256(f"{SEED}\x00{item_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2.0**64
        assert r["split"] == ("test" if u < TEST_FRACTION else "train"), item_id
    assert {r["split"] for r in odd["records"].values()} == {"train", "test"}


def test_same_result_whatever_the_file_order(odd, tmp_path):
    """The same files created in the reverse order (other directory order, other mtimes)."""
    _make_folder(tmp_path / "images", order=-1)
    _make_tags(tmp_path / "tags")
    prepare_dataset(tmp_path / "images", tmp_path / "out", tags_dir=tmp_path / "tags", max_side=MAX_SIDE, seed=SEED,
                    test_fraction=TEST_FRACTION, shard_size=4, progress=False)
    again = _read_all(tmp_path / "out")
    assert again.keys() == odd["records"].keys()
    for item_id, r in again.items():
        ref = odd["records"][item_id]
        assert r["split"] == ref["split"] and r["tags"] == ref["tags"], item_id
        assert r["image_bytes"] == ref["image_bytes"] and r["sketch_bytes"] == ref["sketch_bytes"], item_id
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(odd["out"])


def test_save_sketches_writes_pngs(odd):
    root = odd["base"] / "sketches"
    names = sketch_filenames(GOOD + list(BAD))
    assert names["dup/a.jpg"] == "dup/a.jpg.png" and names["dup/a.png"] == "dup/a.png.png"  # no overwriting
    assert names["sub/deep/w.webp"] == "sub/deep/w.png"
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
    assert written == sorted(names[i] for i in GOOD)
    for item_id in GOOD:
        with Image.open(root / names[item_id]) as img:
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), odd["records"][item_id]["sketch"])


def test_loads_with_tfds_recordsource_and_grain(odd, tmp_path):
    import tensorflow_datasets as tfds

    from sketchcomp_jax.data import pipeline as P

    out = odd["out"]
    n_train = odd["summary"].num_examples["train"]
    decoded = tfds.builder_from_directory(os.fspath(out)).as_data_source("train")  # TFDS decodes (no TensorFlow)
    assert len(decoded) == n_train and decoded[0]["image"].shape[2] == 3 and decoded[0]["sketch"].shape[2] == 1
    # tfds.data_source finds it by name in a <data_dir>/sketchcomp/<version>/ layout
    (tmp_path / "sketchcomp").mkdir()
    (tmp_path / "sketchcomp" / records.FORMAT_VERSION).symlink_to(out)
    by_name = tfds.data_source("sketchcomp", data_dir=os.fspath(tmp_path), split="test")
    assert len(by_name) == odd["summary"].num_examples["test"]
    source = P.RecordSource(out, "train")
    assert len(source) == n_train and source.has_tags and source.sketcher == "xdog"
    assert source[0]["id"].decode() in odd["records"]
    it = iter(P.make_train_loader(os.fspath(out), resolution=32, reference_size=16, global_batch_size=2,
                                  shard_index=0, shard_count=1, seed=1))
    batch = next(it)
    assert batch["gt"].shape == (2, 32, 32, 3) and batch["keep_mask"].shape == (2, 32, 32, 1)
    assert batch["sketch"].shape == (2, 32, 32, 3) and batch["reference"].shape == (2, 16, 16, 3)
    assert all(batch[k].dtype == np.float32 for k in ("gt", "keep_mask", "sketch", "reference"))
    assert len(batch["tags"]) == 2


def test_concurrent_opens_do_not_run_tfds_at_once(odd, monkeypatch):
    """grain's read threads open a RecordSource together in each fresh worker; two threads inside
    tensorflow_datasets' lazy imports at once can deadlock (seen: a loader hung forever), so opening is
    serialised. The real ``builder_from_directory`` is wrapped to count the threads inside it."""
    import tensorflow_datasets as tfds

    real = tfds.builder_from_directory
    lock, inside, peak = threading.Lock(), [0], [0]

    def counting(*args, **kwargs):
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        time.sleep(0.02)
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(tfds, "builder_from_directory", counting)
    barrier = threading.Barrier(6)

    def open_one(_):
        barrier.wait()
        return len(records.open_split(odd["out"], "train"))

    with ThreadPoolExecutor(6) as pool:
        lengths = list(pool.map(open_one, range(6)))
    assert lengths == [odd["summary"].num_examples["train"]] * 6
    assert peak[0] == 1


# --------------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------------


class CountingXdog(XdogSketcher):
    """The real XDoG sketcher, counting the images it sketches; optionally interrupted after ``stop_after``."""

    def __init__(self, stop_after: int | None = None):
        self.count = 0
        self.stop_after = stop_after
        self._lock = threading.Lock()

    def __call__(self, images):
        with self._lock:
            if self.stop_after is not None and self.count >= self.stop_after:
                raise KeyboardInterrupt
            self.count += len(images)
        return super().__call__(images)


@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    for i in range(10):
        Image.fromarray(_scene(20 + i, 32, 40)).save(root / f"img{i:02d}.png")
    return root


def _prepare_plain(folder, out, sketcher, **kw):
    """10 images in shards of 2: 7 train (4 shards), 3 test (2 shards)."""
    return prepare_dataset(folder, out, shard_size=2, seed=1, test_fraction=0.3, progress=False, num_threads=2,
                           sketch_fn=sketcher, **kw)


def _marker_count(out, name) -> int:
    return json.loads((out / "_prepare" / f"{name}.done.json").read_text())["num_examples"]


def test_resume_redoes_only_the_damaged_shards(plain_folder, tmp_path):
    out = tmp_path / "out"
    first = CountingXdog()
    s1 = _prepare_plain(plain_folder, out, first)
    assert s1.num_examples == {"train": 7, "test": 3}
    assert first.count == 10 and s1.shards_written == 6
    reference = _shard_bytes(out)
    info = (out / "dataset_info.json").read_text()

    # a complete dataset is left alone
    again = CountingXdog()
    assert _prepare_plain(plain_folder, out, again).shards_written == 0 and again.count == 0

    # a damaged marker (not even UTF-8) → only that shard is redone
    n = _marker_count(out, "test-00001")
    (out / "_prepare" / "test-00001.done.json").write_bytes(b"\xff\xfe\x00garbage")
    redo = CountingXdog()
    s2 = _prepare_plain(plain_folder, out, redo)
    assert (s2.shards_written, s2.shards_reused) == (1, 5) and redo.count == n == 1
    # a truncated shard file (its size no longer matches its marker) and a deleted marker
    n = _marker_count(out, "train-00000") + _marker_count(out, "train-00002")
    shard_file = out / records.shard_filename("train", 0, 4)
    shard_file.write_bytes(shard_file.read_bytes()[:100])
    (out / "_prepare" / "train-00002.done.json").unlink()
    redo = CountingXdog()
    s3 = _prepare_plain(plain_folder, out, redo)
    assert (s3.shards_written, s3.shards_reused) == (2, 4) and redo.count == n == 4
    # a damaged plan: rewritten, every shard reused
    (out / "_prepare" / "plan.json").write_text("{not json")
    redo = CountingXdog()
    assert _prepare_plain(plain_folder, out, redo).shards_written == 0 and redo.count == 0
    assert _shard_bytes(out) == reference and (out / "dataset_info.json").read_text() == info


def test_interrupted_run_resumes_to_the_same_result(plain_folder, tmp_path):
    full = tmp_path / "full"
    _prepare_plain(plain_folder, full, CountingXdog())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _prepare_plain(plain_folder, out, CountingXdog(stop_after=5))
    done = sorted(p.name[:-len(".done.json")] for p in (out / "_prepare").glob("*.done.json"))
    assert done == ["train-00000", "train-00001"]  # train is written first; its third shard was interrupted
    with pytest.raises(FileNotFoundError, match="re-run the same command to resume"):
        records.load_builder(out)
    resumed = CountingXdog()
    summary = _prepare_plain(plain_folder, out, resumed)
    assert (summary.shards_written, summary.shards_reused) == (4, 2) and resumed.count == 6
    assert _shard_bytes(out) == _shard_bytes(full)
    assert _read_all(out).keys() == _read_all(full).keys()


def test_save_sketches_on_a_finished_dataset(plain_folder, tmp_path):
    out = tmp_path / "out"
    _prepare_plain(plain_folder, out, CountingXdog())
    later = CountingXdog()
    _prepare_plain(plain_folder, out, later, save_sketches=tmp_path / "sk")
    assert later.count == 0  # exported from the records, nothing recomputed
    recs = _read_all(out)
    assert sorted(p.name for p in (tmp_path / "sk").glob("*.png")) == sorted(recs)  # img00.png → img00.png
    for item_id, r in recs.items():
        assert (tmp_path / "sk" / item_id).read_bytes() == r["sketch_bytes"]


def test_other_settings_are_refused(plain_folder, tmp_path):
    out = tmp_path / "out"
    _prepare_plain(plain_folder, out, CountingXdog())
    with pytest.raises(FileExistsError, match="--overwrite"):
        _prepare_plain(plain_folder, out, CountingXdog(), max_side=16)
    s = _prepare_plain(plain_folder, out, CountingXdog(), max_side=16, overwrite=True)
    assert s.shards_reused == 0 and all(max(r["size"]) <= 16 for r in _read_all(out).values())


# --------------------------------------------------------------------------------------------------
# PiDiNet
# --------------------------------------------------------------------------------------------------


def test_pidinet_sketcher(fixtures_dir, tmp_path):
    """Three 40 × 56 images: ``--pidinet_bucket 1`` is PiDiNet at the native size (the original's way), as
    one batch; the approximate bucket 64 pads to 64 × 64 and changes the sketch near the padded border."""
    from sketchcomp_jax.data.sketches import PidinetSketcher

    weights = fixtures_dir / "pidinet" / "table5_pidinet.pth"
    for i in range(3):
        Image.fromarray(_scene(40 + i, 40, 56)).save(tmp_path / f"p{i}.png")
    native = prepare_dataset(tmp_path, tmp_path / "native", sketcher="pidinet", pidinet_weights=os.fspath(weights),
                             pidinet_bucket=1, test_fraction=0.0, progress=False)
    assert native.num_skipped == 0
    recs = _read_all(tmp_path / "native")
    sketcher = PidinetSketcher.from_checkpoint(weights)
    for item_id, r in recs.items():
        np.testing.assert_array_equal(r["sketch"], sketcher.sketch(r["image"]), err_msg=item_id)
    meta = records.dataset_metadata(tmp_path / "native")
    assert meta["sketcher"] == "pidinet" and "table5_pidinet.pth" in meta["sketcher_details"]
    assert meta["settings"]["pidinet_bucket"] == 1

    prepare_dataset(tmp_path, tmp_path / "bucketed", sketcher="pidinet", pidinet_weights=os.fspath(weights),
                    pidinet_bucket=64, test_fraction=0.0, progress=False)
    bucketed = _read_all(tmp_path / "bucketed")
    for item_id, r in bucketed.items():
        ref = recs[item_id]["sketch"]
        assert r["sketch"].shape == ref.shape
        assert (r["sketch"] == ref).mean() > 0.8  # measured 0.88-0.95 on these tiny images
        assert (r["sketch"][:24, :40] == ref[:24, :40]).mean() > 0.9  # away from the padded bottom/right
        assert (r["sketch"] == 255).mean() > 0.05
    assert records.dataset_metadata(tmp_path / "bucketed")["settings"]["pidinet_bucket"] == 64


# --------------------------------------------------------------------------------------------------
# the CLI
# --------------------------------------------------------------------------------------------------


def _cli(*args, cwd=REPO):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "launch/prepare_data.py", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_synthetic(tmp_path):
    out = tmp_path / "synth"
    r = _cli("--synthetic", 16, "--out", out, "--size", 48, "--save_sketches", tmp_path / "sk", "--noprogress")
    assert r.returncode == 0, r.stderr
    meta = records.dataset_metadata(out)
    assert meta["sketcher"] == "synthetic" and sum(meta["num_examples"].values()) == 16
    for split, n in meta["num_examples"].items():
        assert f"{split}: {n} examples" in r.stdout
    assert len(list((tmp_path / "sk" / "synthetic").glob("*.png"))) == 16
    from sketchcomp_jax.data import pipeline as P

    batch = next(iter(P.make_train_loader(os.fspath(out), resolution=32, reference_size=16, global_batch_size=4,
                                          shard_index=0, shard_count=1)))
    assert batch["gt"].shape == (4, 32, 32, 3)
    # options that do not apply to the synthetic set are refused, not silently ignored
    r = _cli("--synthetic", 4, "--out", tmp_path / "s2", "--sketcher", "pidinet")
    assert r.returncode == 2 and "--sketcher" in r.stderr and "do not apply" in r.stderr


def test_cli_images_and_errors(plain_folder, tmp_path):
    folder = tmp_path / "imgs"
    shutil.copytree(plain_folder, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    out = tmp_path / "out"
    r = _cli("--images", folder, "--out", out, "--max_side", 32, "--noprogress")
    assert r.returncode == 0, r.stderr
    assert "skipped: 1" in r.stdout and "- broken.jpg: corrupt or truncated" in r.stdout
    assert sum(records.dataset_metadata(out)["num_examples"].values()) == 10
    r = _cli("--images", folder, "--out", out, "--max_side", 16, "--noprogress")
    assert r.returncode == 2 and "holds a different preparation" in r.stderr and "--overwrite" in r.stderr
    r = _cli("--images", tmp_path / "nope", "--out", tmp_path / "o2")
    assert r.returncode == 2 and "is not a directory" in r.stderr
    r = _cli("--images", folder, "--out", tmp_path / "o3", "--sketcher", "pidinet")
    assert r.returncode == 2 and "--pidinet_weights" in r.stderr

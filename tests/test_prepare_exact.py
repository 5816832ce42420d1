"""`prepare_data.py`'s default PiDiNet sketches are the original's: photos other than the fixtures'
(scikit-image's `coffee` and `rocket`, cropped to odd sizes that are not multiples of 8, so PiDiNet's
floor-mode pooling and non-integer up-sampling are exercised) go through `prepare_dataset` with default
settings, and the stored sketches are compared with the PyTorch reference forward of the converted
PiDiNet (`tests/test_pidinet._torch_pidinet`) followed by the original's uint8 truncation and `> 153`
binarisation. Acceptance: ≤ 0.2 % differing pixels (the float32 fuse maps agree to ~1e-6, so only pixels
within rounding of the 0.6 threshold can flip; measured 0 here).
"""
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from sketchcomp_jax.data import records
from sketchcomp_jax.data.prepare import prepare_dataset
from sketchcomp_jax.data.sketches import binarize_fuse, fuse_to_uint8, preprocess_pidinet

from tests.test_pidinet import _torch_pidinet

MAX_DIFF = 0.002


def _photos():
    skd = pytest.importorskip("skimage.data")
    return {
        "coffee.png": skd.coffee()[101:238, 150:331],   # 137 × 181
        "rocket.png": skd.rocket()[60:215, 201:350],    # 155 × 149
    }


def _reference_sketch(sd, image: np.ndarray) -> np.ndarray:
    x = np.asarray(preprocess_pidinet(image[None])).transpose(0, 3, 1, 2).copy()
    fuse = _torch_pidinet(sd, x)[0, ..., 4]
    return binarize_fuse(fuse_to_uint8(fuse))


def _compare(data_dir, photos, sd):
    """{name: fraction of pixels where the stored sketch differs from the reference}."""
    src = records.open_split(data_dir, "train")
    stored = {}
    for i in range(len(src)):
        r = src[i]
        stored[r["id"].decode()] = (records.decode_image(r["image"]), records.decode_sketch(r["sketch"]))
    fractions = {}
    for name, image in photos.items():
        img, sketch = stored[name]
        np.testing.assert_array_equal(img, image)  # stored at the native size, untouched
        ref = _reference_sketch(sd, image)
        assert sketch.shape == ref.shape == image.shape[:2]
        fractions[name] = float((sketch != ref).mean())
    return fractions


def test_default_pidinet_sketches_are_the_originals(fixtures_dir, tmp_path):
    pytest.importorskip("torch")
    photos = _photos()
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in photos.items():
        Image.fromarray(image).save(folder / name)
    weights = fixtures_dir / "pidinet" / "table5_pidinet.pth"
    prepare_dataset(folder, tmp_path / "ds", sketcher="pidinet", pidinet_weights=os.fspath(weights),
                    test_fraction=0.0, progress=False)
    meta = records.dataset_metadata(tmp_path / "ds")
    assert meta["settings"]["pidinet_bucket"] == 0 and meta["settings"]["max_side"] == 0
    assert "native size (exact)" in meta["sketcher_details"]
    sd = load_file(str(fixtures_dir / "pidinet" / "table5_pidinet_converted.safetensors"))
    fractions = _compare(tmp_path / "ds", photos, sd)
    print("differing pixel fractions (default flags):", fractions)
    assert all(f <= MAX_DIFF for f in fractions.values()), fractions


@pytest.mark.slow  # full-size photos at native size, plus the approximate bucket for contrast (minutes on CPU)
def test_full_size_photos_default_exact_bucket_approximate(fixtures_dir, tmp_path):
    pytest.importorskip("torch")
    skd = pytest.importorskip("skimage.data")
    photos = {"coffee.png": skd.coffee(), "rocket.png": skd.rocket()}  # 400 × 600, 427 × 640
    folder = tmp_path / "images"
    folder.mkdir()
    for name, image in photos.items():
        Image.fromarray(image).save(folder / name)
    weights = os.fspath(fixtures_dir / "pidinet" / "table5_pidinet.pth")
    sd = load_file(str(fixtures_dir / "pidinet" / "table5_pidinet_converted.safetensors"))
    prepare_dataset(folder, tmp_path / "exact", sketcher="pidinet", pidinet_weights=weights, test_fraction=0.0,
                    progress=False)
    exact = _compare(tmp_path / "exact", photos, sd)
    prepare_dataset(folder, tmp_path / "b64", sketcher="pidinet", pidinet_weights=weights, pidinet_bucket=64,
                    test_fraction=0.0, progress=False)
    bucketed = _compare(tmp_path / "b64", photos, sd)
    print("default:", exact, "bucket 64:", bucketed)
    assert all(f <= MAX_DIFF for f in exact.values()), exact
    assert max(bucketed.values()) > max(exact.values())  # padding is visible: why it is not the default

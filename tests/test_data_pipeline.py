"""The grain input pipeline and the original's sample construction (SPEC §2.3, §3.5-3.6).

Fast (tiny images, a 40-image synthetic set). The OpenCV and `bezier` goldens below were produced by
opencv-python 4.10 / bezier 2024.6.20 running the original's calls; the randomized comparisons run against
the installed packages (test extras: opencv-python-headless < 5, bezier).
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sketchcomp_jax.data import image_ops as ops
from sketchcomp_jax.data import pipeline as P
from sketchcomp_jax.data import sample_recipe as R
from sketchcomp_jax.data.synthetic import render_scene, write_synthetic_dataset
from sketchcomp_jax.models.clip_norm import CLIP_MEAN, CLIP_STD
from sketchcomp_jax.ops import resize as rs

# bezier 2024.6.20: the original's point list (jitter 0) for (bbox, extended bbox)
BEZIER_GOLDEN = [
    ([30, 40, 130, 90], [10, 21, 170, 117], [(35.0, 38.195), (40.0, 36.580000000000005), (45.0, 35.154999999999994), (50.00000000000001, 33.92), (55.0, 32.875), (60.0, 32.019999999999996), (65.0, 31.354999999999997), (70.0, 30.88), (75.0, 30.595000000000006), (80.0, 30.5), (85.0, 30.595), (90.0, 30.880000000000003), (95.0, 31.355), (100.0, 32.02), (115.0, 35.155), (133.79999999999998, 42.5), (137.20000000000002, 45.0), (140.20000000000002, 47.5), (142.79999999999998, 50.00000000000001), (145.0, 52.5), (146.8, 55.0), (148.2, 57.5), (149.20000000000002, 60.0), (149.8, 62.50000000000001), (150.0, 65.0), (149.2, 70.0), (146.79999999999998, 75.0), (142.8, 80.0), (140.2, 82.5), (137.2, 85.0), (125.0, 92.565), (120.0, 94.86000000000001), (115.0, 96.885), (110.00000000000001, 98.64000000000001), (105.0, 100.125), (100.0, 101.34), (94.99999999999999, 102.285), (90.0, 102.96000000000002), (85.00000000000001, 103.36500000000001), (80.0, 103.5), (69.99999999999999, 102.96000000000001), (50.0, 98.64), (44.999999999999986, 96.88499999999999), (40.0, 94.86), (28.099999999999998, 87.49999999999999), (26.400000000000002, 85.00000000000001), (24.9, 82.5), (23.6, 80.0), (22.5, 77.5), (21.599999999999998, 74.99999999999999), (20.899999999999995, 72.5), (20.4, 70.0), (20.1, 67.5), (20.0, 65.0), (20.9, 57.5), (21.6, 55.0), (24.900000000000002, 47.49999999999999), (26.4, 45.0)]),
    ([0, 0, 0, 0], [0, 0, 3, 0], [(0.0, 0.0), (0.28500000000000003, 0.0), (0.0, 0.0), (0.0, 0.0)]),
    ([57, 12, 211, 199], [57, 5, 250, 230], [(64.7, 11.334999999999997), (72.4, 10.74), (80.10000000000001, 10.214999999999998), (87.80000000000001, 9.760000000000002), (95.5, 9.375), (103.20000000000002, 9.059999999999999), (110.9, 8.814999999999998), (118.60000000000001, 8.64), (126.30000000000003, 8.535000000000002), (134.0, 8.5), (141.70000000000002, 8.535), (157.10000000000002, 8.815), (164.8, 9.06), (187.9, 10.215), (214.70499999999998, 21.349999999999998), (218.02, 30.700000000000003), (220.94500000000002, 40.050000000000004), (223.48000000000002, 49.400000000000006), (225.625, 58.75), (227.38000000000002, 68.10000000000002), (228.74499999999995, 77.45), (229.72000000000003, 86.80000000000001), (230.305, 96.15), (230.5, 105.5), (228.745, 133.55), (227.38, 142.9), (220.945, 170.95000000000002), (203.3, 201.94499999999996), (195.60000000000002, 204.58), (187.9, 206.90500000000003), (180.20000000000002, 208.92000000000004), (172.5, 210.625), (164.79999999999998, 212.01999999999998), (157.09999999999997, 213.105), (149.4, 213.88), (141.70000000000002, 214.34500000000003), (134.0, 214.5), (126.3, 214.345), (103.19999999999999, 212.02), (87.8, 208.92000000000002), (80.09999999999998, 206.905), (72.4, 204.57999999999998), (57.0, 189.64999999999998), (57.00000000000001, 180.3), (56.99999999999999, 170.95000000000002), (57.000000000000014, 114.85000000000002)]),
]

CV2_GOLDEN = {  # opencv-python 4.10.0 outputs (uint8 bytes, hex)
    'img': ((7, 9, 3), (
        "cde9f303999caeae236dcb97db36c70d96eab9e82e816938058c4d41b1fd322fd6e067554c2b082d49960959f36ce5cf"
        "906f8e73795660ece93010736994cd460c49ecc9586fdbd1f001a6dced01d0e32c1c6b062108528388a3a6440600b63e"
        "beccc03d4b7f01d32dd5c5ca682bb9363daadb68e4c8d0bdfe4af225e1c243a1ffba4870e58f6aed1b293abdc5555e3b"
        "1dd1c5d5e47693ccdbf08936bf76a684eb7b4dcbbb3a473be86eab3e21af782a8506f2010c196f7f989422042a"
    )),
    'down_5x4': ((4, 5, 3), (
        "64acdbad923e9a3db57fd285517b53478aa76779accfc755c634aacae3294d34a1ce7cd1de58dc40a5e6c97e7069807c"
        "97678c9b707f5a6358676e69"
    )),
    'up_13x11': ((11, 13, 3), (
        "cde9f360bec42a9e80a1ac2c86c06a8f9da6db36c74c78df4fb5a2b5de2f8e8636487942058c4d8dcff84e98d4407199"
        "b78b4385874b6c6d728c3eb13368db40a4c095dd758b886562775937835144b6fb3a6ce2573ab4c8666880422d473636"
        "3e55902060d2398ee27ac9c5908e928a7e6b7b835257dcee4372ba453295827faa6141646a4146b8a66972b2b78289ca"
        "cb4aa6c8aa47bfc82fb6c63747bd96385e7d3b2b7b6d85b76c4b6777523a96c24e8fcfa5998eb7ac2b8d94b530acde38"
        "d2d8651c6b061f362f3826657b7e9d995e4273671700b63e84c5988c9aa73855790fb44063cd75d5c5ca4c42783c3582"
        "4f3b99b06ec7bb8d9ab48f8ba271b072b9bc52b7c74581c76a7c74a78d70dfa28d8c27925e45a35461b2ac65b6a4a7bc"
        "b5b4c4f374d079bbcb55c2c87895c2aa658fc27b77caa86fe11c36876d82439ea75e655441a59561d2b0d9d681a1d0be"
        "aab4a1de894fc6788ca7a68f8de279957b78647c795377799d68785c6da05275a7a27e7e62c26c58a75e77505a937a8c"
        "787c784f6d4f4dcbbb438476625055da6ba27f3ead5024a2782a8529b42a089e2b152372647b8b54536322042a"
    )),
    'rot_17': ((7, 9, 3), (
        "5439b2c067455e6b539b42be1299e4a1e7608a706c697a599b876f1787ad9da43770905b6648921356dc6f9ecfb99a68"
        "c7d528c7e51e3d76db97518a7a4648765850a3c5959e87ba886c6465d3539fc2994a98ce42398f6c739e784d2a35bc55"
        "99c0bb4276b18e6c60e2926b338f55210853957db1b78c70d467cf52caca7da6b4be738d96c688443d7b4136a48f61ba"
        "81a7ae9fc8a5a7d1a17c9d6a7461775c5e6a725793955c764d8f8a7170874f50a65f60653ec14f9c6558b1859e"
    )),
    'blur_5': ((7, 9, 3), (
        "6877a35668976e759163698e7e7a8d7f7f828994838c9c76a59968667094576487667181616a87757d866d827e739388"
        "779b7e859c6f676c995e678d75738e6f76948287967b8a8881958b7e9b7c8a94716660965d5e8b717087707e94838996"
        "82908b909f8e909f8699917c68648e5e618775708773848e8186917f8e838b997e879b788c7f736c6581626c85777683"
        "7191927f918e7d978c879a8583978487817b7864956b729d8a759f7b94a78996a48a97a29492918d8e8b977b87"
    )),
    'elastic_1234': ((7, 9, 3), (
        "6a9196544195429d923730c1a1aa36533f438ac8905298c1bc72908a67714f4fa32342355b5ea2745f3a8249aa53a6d6"
        "5a626fc766706f626bc33b4a36379a7d7c965e41455d61d253b4c9ccb82dcdb8a4658f995c86806c7299b07c6ca6ad55"
        "1865eaa4cc499f9c56a2d7487d3591408180796b6fc2b2c458be7ca06cbc898b72518153c6c52f3d3c745e7b927048ac"
        "bad09058d4bf884a7ca29c564d7c4f7bb8b12a1559d174dc4db0ad76a17073b3b53f975cccdc388b798882ce7d"
    )),
}


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """40 synthetic 64² scenes (about 31 train / 9 test)."""
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("data") / "synth40"), 40, seed=3, size=64)


def _loader(data_dir, **kw):
    args = dict(resolution=32, reference_size=16, global_batch_size=4, seed=7, shard_index=0, shard_count=1)
    args.update(kw)
    return P.make_train_loader(data_dir, **args)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(b1, b2):
    return all(np.array_equal(b1[k], b2[k]) for k in ("gt", "keep_mask", "sketch", "reference"))


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------


def test_clip_constants_are_openai_clip():
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert list(CLIP_MEAN) == list(OPENAI_CLIP_MEAN) and list(CLIP_STD) == list(OPENAI_CLIP_STD)


def test_luts_are_torchvision_float32():
    import torch
    v = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 256).expand(3, 1, 256).float().div(255)
    unit = (v - 0.5) / 0.5
    mean = torch.tensor(CLIP_MEAN).reshape(3, 1, 1)
    std = torch.tensor(CLIP_STD).reshape(3, 1, 1)
    clip = (v - mean) / std
    np.testing.assert_array_equal(R.LUT_UNIT, unit[0, 0].numpy())
    np.testing.assert_array_equal(R.LUT_CLIP, clip[:, 0].numpy())


def test_random_bbox_matches_the_original_rule():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        w, h = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        x0, y0, x1, y1 = R.random_bbox((w, h), rng)
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert (x1 - x0) % 2 == 0 and (y1 - y0) % 2 == 0  # 2·(sw//2)
    sizes = np.array([R.random_bbox((101, 51), rng) for _ in range(4000)])
    # sw ~ U{0..W}: the box width 2·(sw//2) averages ≈ W/2
    assert abs((sizes[:, 2] - sizes[:, 0]).mean() - 50) < 2.5
    assert abs((sizes[:, 3] - sizes[:, 1]).mean() - 25) < 1.5


def test_pad_and_extend_stay_inside_the_image():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        w, h = int(rng.integers(1, 80)), int(rng.integers(1, 80))
        b = R.random_bbox((w, h), rng)
        p = R.pad_bbox(b, (w, h))
        e = R.extend_bbox(b, (w, h), rng)
        assert 0 <= p[0] <= b[0] and 0 <= p[1] <= b[1] and b[2] <= p[2] <= w and b[3] <= p[3] <= h
        assert b[0] - p[0] == min(10, b[0]) and p[3] - b[3] == min(10, h - b[3])
        assert p[2] > p[0] and p[3] > p[1]  # the reference crop is never empty
        assert 0 <= e[0] <= b[0] and 0 <= e[1] <= b[1] and b[2] <= e[2] <= w and b[3] <= e[3] <= h
        assert b[0] - e[0] <= int(0.4 * b[0]) and e[2] - b[2] <= int(0.4 * (w - b[2]))


def test_bezier_points_match_the_bezier_package():
    """Exact floats from ``bezier.Curve.evaluate`` and the original's de-duplication (jitter 0)."""
    for bbox, ext, expected in BEZIER_GOLDEN:
        assert R.bezier_polygon(bbox, ext, np.random.default_rng(0), jitter=0) == expected
    # a symmetric side: the mirror half is dropped only where the floats coincide exactly
    ys = [R.bezier_evaluate([(0.0, 100.0), (50.0, 37.0), (100.0, 100.0)], i * 0.05)[1] for i in range(1, 19)]
    assert ys[:3] == [94.015, 88.66000000000001, 83.93499999999999]
    assert ys[7] == ys[11] == 69.76 and ys[8] != ys[10]


def test_bezier_evaluate_random_curves_against_the_package():
    import bezier
    rng = np.random.default_rng(2)
    for _ in range(300):
        nodes = rng.integers(0, 500, (3, 2)).astype(float)
        nodes[1, 0] = (nodes[0, 0] + nodes[2, 0]) / 2
        curve = bezier.Curve(np.asfortranarray(nodes.T), degree=2)
        for i in range(1, 19):
            ref = curve.evaluate(i * 0.05)
            assert R.bezier_evaluate([tuple(n) for n in nodes], i * 0.05) == (ref[0][0], ref[1][0])


def test_bezier_hole_stays_inside_the_extended_box():
    rng = np.random.default_rng(3)
    w, h = 90, 70
    n_holes = 0
    for _ in range(400):
        b = R.random_bbox((w, h), rng)
        e = R.extend_bbox(b, (w, h), rng)
        keep = R.polygon_keep_mask(R.bezier_polygon(b, e, rng), (w, h))
        assert set(np.unique(keep)) <= {0, 1}
        ys, xs = np.nonzero(keep == 0)
        if xs.size:
            n_holes += 1
            # control points lie on the extended box, jitter ±5, PIL rounds to the nearest pixel
            assert xs.min() >= e[0] - 6 and xs.max() <= e[2] + 6
            assert ys.min() >= e[1] - 6 and ys.max() <= e[3] + 6
    assert n_holes > 300


def test_rectangle_mask_is_the_extended_box():
    keep = R.rectangle_keep_mask([3, 2, 7, 9], (10, 12))
    assert keep.shape == (12, 10) and keep.dtype == np.uint8
    assert (keep[2:9, 3:7] == 0).all() and keep.sum() == 120 - 7 * 4


def test_square_crop_window():
    rng = np.random.default_rng(4)
    for _ in range(2000):
        w, h = int(rng.integers(2, 90)), int(rng.integers(2, 90))
        b = R.random_bbox((w, h), rng)
        e = R.extend_bbox(b, (w, h), rng)
        top, bottom, left, right = R.square_crop_window((w, h), e, rng)
        if w == h or (top, bottom, left, right) == (0, h, 0, w):
            continue
        assert bottom - top == right - left  # square
        assert top <= e[1] and bottom >= e[3] and left <= e[0] and right >= e[2]  # keeps the extended box
        assert 0 <= top and bottom <= h and 0 <= left and right <= w
    assert R.square_crop_window((40, 40), [5, 5, 10, 10], rng) == (0, 40, 0, 40)


# --------------------------------------------------------------------------------------------------
# The reference augmentation's OpenCV calls (pinned to opencv-python 4.10 goldens)
# --------------------------------------------------------------------------------------------------


def _golden(name):
    shape, chunks = CV2_GOLDEN[name]
    return np.frombuffer(bytes.fromhex("".join(chunks)), np.uint8).reshape(shape)


def test_cv2_operations_match_opencv_goldens():
    img = _golden("img")
    np.testing.assert_array_equal(ops.cv2_resize_linear(img, 5, 4), _golden("down_5x4"))
    np.testing.assert_array_equal(ops.cv2_resize_linear(img, 13, 11), _golden("up_13x11"))
    np.testing.assert_array_equal(ops.cv2_warp_affine(img, ops.cv2_rotation_matrix((9 / 2, 7 / 2), 17.0)), _golden("rot_17"))
    np.testing.assert_array_equal(ops.cv2_box_blur(img, 5), _golden("blur_5"))
    np.testing.assert_array_equal(ops.elastic_transform(img, 1234, alpha_affine=3.0), _golden("elastic_1234"))


def test_cv2_operations_random_against_opencv():
    import cv2
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(5)
    for _ in range(6):
        h, w = int(rng.integers(5, 300)), int(rng.integers(5, 300))
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(ops.cv2_resize_linear(img, 224, 224), cv2.resize(img, (224, 224), interpolation=cv2.INTER_LINEAR))
        r = cv2.resize(img, (224, 224), interpolation=cv2.INTER_LINEAR)
        angle = float(rng.uniform(-20, 20))
        ref = cv2.warpAffine(r, cv2.getRotationMatrix2D((112.0, 112.0), angle, 1.0), (224, 224),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        np.testing.assert_array_equal(ops.cv2_warp_affine(r, ops.cv2_rotation_matrix((112.0, 112.0), angle)), ref)
        for k in (3, 5, 7):
            np.testing.assert_array_equal(ops.cv2_box_blur(r, k), cv2.blur(r, (k, k)))
        state = int(rng.integers(0, 10001))
        rs = np.random.RandomState(state)
        c, s = np.float32((224, 224)) // 2, 224 // 3
        pts1 = np.float32([c + s, [c[0] + s, c[1] - s], c - s])
        pts2 = pts1 + rs.uniform(-50, 50, size=pts1.shape).astype(np.float32)
        warped = cv2.warpAffine(r, cv2.getAffineTransform(pts1, pts2), (224, 224), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT_101)
        dx = np.float32(gaussian_filter(rs.rand(224, 224) * 2 - 1, 50))
        dy = np.float32(gaussian_filter(rs.rand(224, 224) * 2 - 1, 50))
        x, y = np.meshgrid(np.arange(224), np.arange(224))
        ref = cv2.remap(warped, np.float32(x + dx), np.float32(y + dy), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        np.testing.assert_array_equal(ops.elastic_transform(r, state), ref)


def test_gaussian_filter_reflect_matches_scipy():
    from scipy import ndimage

    rng = np.random.default_rng(6)
    for shape, sigma in [((224, 224), 50.0), ((30, 7), 50.0), ((40, 50), 2.5), ((1, 5), 50.0)]:
        a = rng.random(shape) * 2 - 1
        np.testing.assert_allclose(ops.gaussian_filter_reflect(a, sigma), ndimage.gaussian_filter(a, sigma), atol=1e-15)


def test_reference_augmentation_draws():
    rng = np.random.default_rng(7)
    draws = [R.ReferenceAugmentation.draw(rng) for _ in range(4000)]
    assert abs(np.mean([d.flip for d in draws]) - 0.5) < 0.03
    assert abs(np.mean([d.angle is not None for d in draws]) - 0.5) < 0.03
    assert abs(np.mean([d.blur_ksize is not None for d in draws]) - 0.3) < 0.03
    assert abs(np.mean([d.elastic_state is not None for d in draws]) - 0.3) < 0.03
    angles = np.array([d.angle for d in draws if d.angle is not None])
    assert angles.min() >= -20 and angles.max() <= 20
    assert {d.blur_ksize for d in draws} == {None, 3, 5, 7}


# --------------------------------------------------------------------------------------------------
# resizing (torchvision 0.12 tensor Resize)
# --------------------------------------------------------------------------------------------------


def test_resize_matches_torch_and_the_model_side_resize():
    import torch
    import jax.numpy as jnp

    from sketchcomp_jax.ops.resize import resize_bilinear as resize_bilinear_no_antialias

    rng = np.random.default_rng(8)
    for h, w, r in [(421, 379, 333), (37, 90, 64), (512, 700, 512), (64, 64, 64), (5, 3, 32)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = rs.resize_u8_bilinear(img, r, r, R.LUT_UNIT)
        t = (torch.from_numpy(img).permute(2, 0, 1).float().div(255) - 0.5) / 0.5
        ref = torch.nn.functional.interpolate(t[None], size=(r, r), mode="bilinear", align_corners=False)[0]
        np.testing.assert_allclose(ours, ref.permute(1, 2, 0).numpy(), rtol=0, atol=2.5e-7)
        model_side = np.asarray(resize_bilinear_no_antialias(jnp.asarray(R.LUT_UNIT[img][None]), r, r))[0]
        np.testing.assert_allclose(ours, model_side, rtol=0, atol=2.5e-7)  # one resize: same coefficients
        np.testing.assert_allclose(rs.resize_bilinear_np(R.LUT_UNIT[img], r, r), ours, rtol=0, atol=2.5e-7)
    same = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
    np.testing.assert_array_equal(rs.resize_u8_bilinear(same, 16, 16, R.LUT_UNIT), R.LUT_UNIT[same])


# --------------------------------------------------------------------------------------------------
# whole samples
# --------------------------------------------------------------------------------------------------


def _original_keep_mask(w: int, h: int, rnd: random.Random, percent: float) -> tuple[np.ndarray, bool]:
    """A literal transcription of the original's mask geometry with Python's ``random`` (random_bbox,
    extended box, Bézier-or-rectangle mask, square crop): the keep mask of the cropped region."""
    from PIL import Image, ImageDraw

    sw, sh = rnd.randint(0, w), rnd.randint(0, h)
    cx, cy = rnd.randint(sw // 2, w - sw // 2), rnd.randint(sh // 2, h - sh // 2)
    bbox = [cx - sw // 2, cy - sh // 2, cx + sw // 2, cy + sh // 2]
    ext = list(bbox)
    ext[0] = bbox[0] - rnd.randint(0, int(0.4 * (bbox[0] - 0)))
    ext[1] = bbox[1] - rnd.randint(0, int(0.4 * (bbox[1] - 0)))
    ext[2] = bbox[2] + rnd.randint(0, int(0.4 * (w - bbox[2])))
    ext[3] = bbox[3] + rnd.randint(0, int(0.4 * (h - bbox[3])))
    bez = rnd.uniform(0, 1) < percent
    if bez:
        mask_img = Image.new("RGB", (w, h), (255, 255, 255))
        x0, y0, x1, y1 = bbox
        curves = [[(x0, y0), ((x0 + x1) / 2, ext[1]), (x1, y0)], [(x1, y0), (ext[2], (y0 + y1) / 2), (x1, y1)],
                  [(x1, y1), ((x0 + x1) / 2, ext[3]), (x0, y1)], [(x0, y1), (ext[0], (y0 + y1) / 2), (x0, y0)]]
        pts = []
        for nodes in curves:
            xl, yl = [], []
            for i in range(1, 19):
                px, py = R.bezier_evaluate([(float(a), float(b)) for a, b in nodes], i * 0.05)
                if px not in xl and py not in yl:
                    pts.append((px + rnd.randint(-5, 5), py + rnd.randint(-5, 5)))
                    xl.append(px)
                    yl.append(py)
        ImageDraw.Draw(mask_img).polygon(pts, fill=(0, 0, 0))
        mask = np.asarray(mask_img)[..., 0] / 255.0
    else:
        rect = np.zeros((h, w))
        rect[ext[1]:ext[3], ext[0]:ext[2]] = 1
        mask = 1 - rect
    if w > h:
        left_most = max(ext[2] - h, 0)
        right_most = min(ext[0] + h, w) - h
        if right_most > left_most:
            left = rnd.randint(left_most, right_most)
            free = min(ext[1] - 0, ext[0] - left, left + h - ext[2], h - ext[3])
            r = rnd.randint(0, int(0.6 * free))
            mask = mask[r:h - r, left + r:left + h - r]
    elif w < h:
        upper_most = max(ext[3] - w, 0)
        lower_most = min(ext[1] + w, h) - w
        if lower_most > upper_most:
            upper = rnd.randint(upper_most, lower_most)
            free = min(ext[1] - upper, ext[0] - 0, w - ext[2], upper + w - ext[3])
            r = rnd.randint(0, int(0.6 * free))
            mask = mask[upper + r:upper + w - r, r:w - r]
    return mask, bez


@pytest.mark.parametrize("w,h", [(96, 64), (64, 96), (64, 64)])
def test_mask_statistics_match_the_original(w, h):
    """Hole-area distribution and the 50 % Bézier/rectangle split, ours vs the transcribed original."""
    from scipy import stats

    n, res = 1500, 32
    rnd = random.Random(11)
    orig_keep, orig_bez = [], []
    for _ in range(n):
        m, bez = _original_keep_mask(w, h, rnd, 0.5)
        orig_keep.append(float(rs.resize_u8_bilinear(m.astype(np.uint8)[..., None], res, res, R.LUT_IDENTITY).mean()))
        orig_bez.append(bez)
    rng = np.random.default_rng(12)
    image = np.zeros((h, w, 3), np.uint8)
    sketch = np.zeros((h, w), np.uint8)
    ours_keep, ours_bez = [], []
    for _ in range(n):
        s = R.make_sample(image, sketch, rng, resolution=res, reference_size=8, augment=False, return_boxes=True)
        ours_keep.append(float(s["keep_mask"].mean()))
        ours_bez.append(s["boxes"].bezier)
    assert abs(np.mean(ours_bez) - 0.5) < 0.045 and abs(np.mean(orig_bez) - 0.5) < 0.045
    assert abs(np.mean(ours_keep) - np.mean(orig_keep)) < 0.03
    assert stats.ks_2samp(ours_keep, orig_keep).pvalue > 1e-3
    # the holes are large on average (random boxes of U(0, W) × U(0, H), then zoomed in)
    assert 0.15 < 1 - np.mean(ours_keep) < 0.6


def test_reference_comes_from_the_roi():
    """Pixels encode their own coordinates, so the un-augmented reference shows where it was cut."""
    h, w = 150, 200
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8)
    rng = np.random.default_rng(13)
    for _ in range(50):
        s = R.make_sample(image, np.zeros((h, w), np.uint8), rng, resolution=16, reference_size=24, augment=False,
                          return_boxes=True)
        x0, y0, x1, y1 = s["boxes"].reference_box
        b = s["boxes"].bbox
        assert x0 == b[0] - min(10, b[0]) and y1 == b[3] + min(10, h - b[3])
        ref = s["reference"] * np.asarray(CLIP_STD, np.float32) + np.asarray(CLIP_MEAN, np.float32)
        ref_x, ref_y = ref[..., 0] * 255, ref[..., 1] * 255
        assert ref_x.min() >= x0 - 0.51 and ref_x.max() <= x1 - 1 + 0.51
        assert ref_y.min() >= y0 - 0.51 and ref_y.max() <= y1 - 1 + 0.51
        expected = R.clip_normalize(ops.cv2_resize_linear(image[y0:y1, x0:x1], 24, 24))
        np.testing.assert_array_equal(s["reference"], expected)


def test_image_sketch_and_mask_are_cropped_identically():
    image, sketch, _ = render_scene(5, 0, 128)
    image, sketch = image[20:100], sketch[20:100]  # 128 × 80: the square crop moves
    rng = np.random.default_rng(14)
    n_line = 0
    for i in range(40):
        # upsampling (crop side ≤ 80 → 96) so that some outputs read only line pixels
        s = R.make_sample(image, sketch, rng, resolution=96, reference_size=16, augment=i % 2 == 0)
        assert s["gt"].shape == (96, 96, 3) and s["keep_mask"].shape == (96, 96, 1)
        assert s["sketch"].shape == (96, 96, 3) and s["reference"].shape == (16, 16, 3)
        assert all(v.dtype == np.float32 for v in s.values())
        line = s["sketch"][..., 0] == 1.0  # every tap on a line pixel → every tap black in the image
        n_line += int(line.sum())
        assert (s["gt"][line] == -1.0).all()
        blank = s["sketch"][..., 0] == -1.0
        assert (s["gt"][blank].max(axis=-1) > -1.0).all()
        assert np.array_equal(s["sketch"][..., 0], s["sketch"][..., 2])
        assert 0.0 <= s["keep_mask"].min() and s["keep_mask"].max() <= 1.0
    assert n_line > 300


def test_augmented_reference_differs_but_stays_normalised():
    image, sketch, _ = render_scene(1, 1, 96)
    rng = np.random.default_rng(15)
    refs = [R.make_sample(image, sketch, rng, resolution=16, reference_size=32)["reference"] for _ in range(30)]
    lo = (0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    hi = (1 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    for r in refs:
        assert r.shape == (32, 32, 3) and (r >= lo - 1e-5).all() and (r <= hi + 1e-5).all()


# --------------------------------------------------------------------------------------------------
# the grain loader
# --------------------------------------------------------------------------------------------------


def test_loader_batches(synth_dir):
    it = iter(_loader(synth_dir))
    b = next(it)
    assert set(b) == {"gt", "keep_mask", "sketch", "reference", "tags"}
    assert b["gt"].shape == (4, 32, 32, 3) and b["keep_mask"].shape == (4, 32, 32, 1)
    assert b["sketch"].shape == (4, 32, 32, 3) and b["reference"].shape == (4, 16, 16, 3)
    assert all(b[k].dtype == np.float32 for k in ("gt", "keep_mask", "sketch", "reference"))
    assert b["gt"].min() >= -1 and b["gt"].max() <= 1 and b["sketch"].min() >= -1 and b["sketch"].max() <= 1
    assert len(b["tags"]) == 4 and all(isinstance(t, str) and "," in t and " " not in t for t in b["tags"])


def test_loader_is_deterministic_across_worker_counts(synth_dir):
    a = _take(iter(_loader(synth_dir)), 3)
    b = _take(iter(_loader(synth_dir)), 3)
    c = _take(iter(_loader(synth_dir, worker_count=2)), 3)
    d = _take(iter(_loader(synth_dir, seed=8)), 3)
    for x, y, z in zip(a, b, c):
        assert _same(x, y) and _same(x, z) and x["tags"] == z["tags"]
    assert not _same(a[0], d[0])


def test_restore_mid_epoch_continues_identically(synth_dir, tmp_path):
    loader = _loader(synth_dir, with_ids=True)
    it = iter(loader)
    _take(it, 2)
    state = P.iterator_state(it)
    json.loads(state)
    expected = _take(it, 5)  # crosses the epoch boundary (31 train records, batch 4)
    it2 = P.restore_iterator_state(iter(_loader(synth_dir, with_ids=True)), state)
    for x, y in zip(expected, _take(it2, 5)):
        assert _same(x, y) and x["id"] == y["id"]

    import orbax.checkpoint as ocp

    it3 = iter(_loader(synth_dir, with_ids=True))
    _take(it3, 2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(2, args=ocp.args.Composite(data=P.checkpoint_save_args(it3)))
        mgr.wait_until_finished()
    it4 = iter(_loader(synth_dir, with_ids=True))
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(2, args=ocp.args.Composite(data=P.checkpoint_restore_args(it4)))
    assert _same(next(it4), expected[0])


def test_epochs_reshuffle_and_cover_the_split(synth_dir):
    n = len(P.RecordSource(synth_dir, "train"))
    it = iter(_loader(synth_dir, global_batch_size=1, num_epochs=2, with_ids=True))
    ids = [b["id"][0] for b in it]
    assert len(ids) == 2 * n
    assert sorted(ids[:n]) == sorted(ids[n:]) and len(set(ids[:n])) == n
    assert ids[:n] != ids[n:]


def test_shards_are_disjoint(synth_dir):
    n = len(P.RecordSource(synth_dir, "train"))
    ids = []
    for shard in range(2):
        it = iter(_loader(synth_dir, global_batch_size=2, shard_index=shard, shard_count=2, num_epochs=1, with_ids=True))
        ids.append([i for b in it for i in b["id"]])
        assert all(len(x) for x in ids)
    assert not set(ids[0]) & set(ids[1])
    assert len(ids[0]) == len(ids[1]) == n // 2
    with pytest.raises(ValueError):
        _loader(synth_dir, global_batch_size=3, shard_index=0, shard_count=2)


def test_eval_mode_has_fixed_masks_per_record(synth_dir):
    def by_id(**kw):
        out = {}
        for b in iter(_loader(synth_dir, split="test", eval_mode=True, global_batch_size=1, with_ids=True, **kw)):
            out[b["id"][0]] = b
        return out

    a, b = by_id(), by_id()
    assert a.keys() == b.keys() and len(a) == len(P.RecordSource(synth_dir, "test"))
    assert all(_same(a[k], b[k]) for k in a)
    # the same record gets the same sample whichever shard reads it
    shard = {}
    for b1 in iter(_loader(synth_dir, split="test", eval_mode=True, global_batch_size=2, shard_index=1,
                           shard_count=2, with_ids=True)):
        shard[b1["id"][0]] = b1
    assert shard and all(_same(shard[k], a[k]) for k in shard)
    # the reference is only resized: deterministic and never flipped/rotated
    assert len({a[k]["reference"].tobytes() for k in a}) == len(a)


def test_to_global_batch(synth_dir):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    n = min(jax.device_count(), 8)
    mesh = jax.make_mesh((n,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    batch = next(iter(_loader(synth_dir, global_batch_size=n, num_epochs=1)))
    out = P.to_global_batch(batch, sharding)
    assert set(out) == {"gt", "keep_mask", "sketch", "reference"}
    for k, v in out.items():
        assert isinstance(v, jax.Array) and v.shape == batch[k].shape and v.sharding == sharding
        np.testing.assert_array_equal(np.asarray(v), batch[k])

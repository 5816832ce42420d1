"""PiDiNet (carv4 + CDCM + CSAM, converted) against the golden fixtures of the original PyTorch code.

Tolerances (README §7-8 of the fixtures): the five sigmoid maps to 1e-5 absolute (measured: <= 1.3e-6,
the same order as the 1.5e-6 the original itself moves between 1 and 8 threads); the uint8 fuse map
(``uint8(fuse * 255)``, truncation) may differ by 1 grey level on at most 0.1 % of the pixels (measured:
0 and 2 pixels); the binary sketch on at most 0.1 % of the pixels (measured: 0); the edge fraction to 1e-3.
"""
from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from sketchcomp_jax.data.sketches import (
    PidinetSketcher,
    binarize_fuse,
    fuse_to_uint8,
    pidinet_edges,
    preprocess_pidinet,
)
from sketchcomp_jax.models.pidinet import PiDiNet
from sketchcomp_jax.ops.resize import resize_bilinear
from sketchcomp_jax.weights.errors import CheckpointError, CheckpointNotFoundError
from sketchcomp_jax.weights.pidinet_weights import (
    PidinetCheckpointError,
    convert_pidinet_state_dict,
    is_converted_pidinet_state_dict,
    load_pidinet_params,
    pidinet_params_from_state_dict,
)

MAPS_ATOL = 1e-5
MAX_DIFF_FRACTION = 1e-3  # 0.1 % of the pixels


@pytest.fixture(scope="module")
def pdir(fixtures_dir):
    return fixtures_dir / "pidinet"


@pytest.fixture(scope="module")
def golden(pdir):
    with np.load(pdir / "pidinet_io.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def params(pdir):
    return load_pidinet_params(pdir / "table5_pidinet.pth")


@pytest.fixture(scope="module")
def sketcher(params):
    return PidinetSketcher(params)


def _assert_trees_equal(a, b, path=""):
    assert set(a) == set(b), path
    for k in a:
        if isinstance(a[k], dict):
            _assert_trees_equal(a[k], b[k], f"{path}/{k}")
        else:
            assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{path}/{k}"
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{path}/{k}")


# ------------------------------------------------------------------------------------------------ weights


def test_conversion_matches_original(pdir):
    raw = load_file(str(pdir / "table5_pidinet.safetensors"))
    expected = load_file(str(pdir / "table5_pidinet_converted.safetensors"))
    before = {k: v.copy() for k, v in raw.items()}
    converted = convert_pidinet_state_dict(raw)
    assert set(converted) == set(expected)  # `module.` stripped
    for k, v in expected.items():
        assert converted[k].shape == v.shape, k
        # Bit-exact: the cd rule sums the taps in PyTorch's CPU reduction order (see convert_pdc).
        np.testing.assert_array_equal(converted[k], v, err_msg=k)
    for k, v in raw.items():  # the input was not touched (the original's cd rule works in place)
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # Already-converted input (detected by the 5x5 rd kernels) is not converted a second time.
    assert not is_converted_pidinet_state_dict({k[len("module."):]: v for k, v in raw.items()})
    assert is_converted_pidinet_state_dict(expected)
    again = convert_pidinet_state_dict(converted)
    for k, v in expected.items():
        np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_pth_and_safetensors_give_identical_params(pdir, params):
    _assert_trees_equal(params, load_pidinet_params(pdir / "table5_pidinet.safetensors"))
    _assert_trees_equal(params, load_pidinet_params(pdir / "table5_pidinet_converted.safetensors"))
    # Layout: torch OIHW -> flax HWIO, ModuleList index folded into the module name.
    assert params["init_block"]["kernel"].shape == (3, 3, 3, 60)
    assert params["block1_2"]["conv1"]["kernel"].shape == (5, 5, 1, 60)  # rd -> 5x5 depth-wise
    assert params["dilations_3"]["conv2_4"]["kernel"].shape == (3, 3, 24, 24)
    assert params["classifier"]["kernel"].shape == (1, 1, 4, 1)


def test_params_match_model_init(params):
    import jax

    shapes = jax.eval_shape(lambda: PiDiNet().init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32)))
    init = jax.tree_util.tree_map(lambda s: s.shape, shapes["params"])
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert init == got


def test_wrong_file_gives_clear_error(tmp_path, pdir):
    other = tmp_path / "not_pidinet.safetensors"
    save_file({"encoder.weight": np.zeros((4, 3, 3, 3), np.float32)}, str(other))
    with pytest.raises(PidinetCheckpointError) as err:
        load_pidinet_params(other)
    msg = str(err.value)
    assert "not a PiDiNet carv4 checkpoint" in msg and str(other) in msg
    assert "missing keys: attentions.0.conv1.bias" in msg and "unexpected keys: encoder.weight" in msg
    assert isinstance(err.value, CheckpointError)

    sd = load_file(str(pdir / "table5_pidinet.safetensors"))
    sd["module.classifier.weight"] = np.zeros((1, 5, 1, 1), np.float32)
    bad_shape = tmp_path / "bad_shape.safetensors"
    save_file(sd, str(bad_shape))
    with pytest.raises(PidinetCheckpointError, match=r"classifier\.weight: \(1, 5, 1, 1\) \(expected \(1, 4, 1, 1\)\)"):
        load_pidinet_params(bad_shape)

    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint at all\n")
    with pytest.raises(CheckpointError):
        load_pidinet_params(text)
    with pytest.raises(CheckpointNotFoundError):
        load_pidinet_params(tmp_path / "missing.pth")
    with pytest.raises(PidinetCheckpointError, match="missing keys"):
        pidinet_params_from_state_dict({})


# ------------------------------------------------------------------------------------------------ forward


def test_preprocessing_bit_exact(golden):
    for i in range(2):
        x = np.asarray(preprocess_pidinet(golden[f"img{i}_uint8_hwc"][None]))
        np.testing.assert_array_equal(x, golden[f"img{i}_input_nchw"].transpose(0, 2, 3, 1))


@pytest.mark.parametrize("i", [0, 1])
def test_golden_maps_uint8_and_sketch(golden, sketcher, i):
    img = golden[f"img{i}_uint8_hwc"]
    h, w = img.shape[:2]
    maps = sketcher.maps(img[None])
    assert maps.shape == (1, h, w, 5) and maps.dtype == np.float32
    ref = golden[f"img{i}_maps"]
    for c, name in enumerate(["e1", "e2", "e3", "e4", "fuse"]):
        err = float(np.abs(maps[0, ..., c] - ref[c]).max())
        assert err <= MAPS_ATOL, f"{golden[f'img{i}_name']} {name}: max abs err {err:.2e}"

    fuse_u8 = fuse_to_uint8(maps[0, ..., 4])
    d = fuse_u8.astype(np.int16) - golden[f"img{i}_fuse_uint8"]
    assert np.abs(d).max() <= 1
    assert np.count_nonzero(d) <= MAX_DIFF_FRACTION * d.size, np.count_nonzero(d)

    sketch = binarize_fuse(maps[0, ..., 4])
    assert sketch.dtype == np.uint8 and set(np.unique(sketch)) <= {0, 255}
    n_bin = np.count_nonzero(sketch != golden[f"img{i}_sketch_bin"])
    assert n_bin <= MAX_DIFF_FRACTION * sketch.size, n_bin
    assert abs(float(np.mean(sketch == 255)) - float(golden[f"img{i}_edge_fraction"])) <= 1e-3

    if i == 1:  # the jitted on-device post-processing equals the numpy one
        np.testing.assert_array_equal(sketcher(img), sketch)
        np.testing.assert_array_equal(sketcher.fuse_uint8(img[None])[0], fuse_u8)


def test_binarize_semantics():
    import jax.numpy as jnp

    fuse = np.array([0.0, 0.5, 0.6, 153.9 / 255, 154 / 255, 0.99999, 1.0], np.float32)
    np.testing.assert_array_equal(fuse_to_uint8(fuse), [0, 127, 153, 153, 154, 254, 255])  # truncation
    np.testing.assert_array_equal(binarize_fuse(fuse), [0, 0, 0, 0, 255, 255, 255])
    np.testing.assert_array_equal(np.asarray(binarize_fuse(jnp.asarray(fuse))), binarize_fuse(fuse))
    np.testing.assert_array_equal(binarize_fuse(np.array([153, 154], np.uint8)), [0, 255])


def test_bilinear_matches_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x = np.random.default_rng(0).standard_normal((2, 5, 7, 3)).astype(np.float32)
    for size in [(37, 53), (40, 56), (5, 7), (3, 4)]:
        ours = np.asarray(resize_bilinear(x, *size))
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False)
        np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=2e-6, rtol=0)


def _torch_pidinet(sd: dict, x_nchw: np.ndarray) -> np.ndarray:
    """Functional PyTorch forward of the converted carv4 PiDiNet (independent check of pooling/upsampling)."""
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    x = torch.from_numpy(x_nchw)
    H, W = x.shape[2:]

    def block(name, x, stride):
        if stride > 1:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        w = t[f"{name}.conv1.weight"]
        y = F.conv2d(x, w, padding=w.shape[-1] // 2, groups=x.shape[1])
        y = F.conv2d(F.relu(y), t[f"{name}.conv2.weight"])
        if stride > 1:
            x = F.conv2d(x, t[f"{name}.shortcut.weight"], t[f"{name}.shortcut.bias"])
        return y + x

    x = F.conv2d(x, t["init_block.weight"], padding=1)
    feats = []
    for s, n in ((1, 3), (2, 4), (3, 4), (4, 4)):
        for j in range(1, n + 1):
            x = block(f"block{s}_{j}", x, 2 if (j == 1 and s > 1) else 1)
        feats.append(x)
    outs = []
    for i, f in enumerate(feats):
        y = F.conv2d(F.relu(f), t[f"dilations.{i}.conv1.weight"], t[f"dilations.{i}.conv1.bias"])
        y = sum(F.conv2d(y, t[f"dilations.{i}.conv2_{j}.weight"], padding=d, dilation=d)
                for j, d in zip(range(1, 5), (5, 7, 9, 11)))
        a = F.conv2d(F.relu(y), t[f"attentions.{i}.conv1.weight"], t[f"attentions.{i}.conv1.bias"])
        y = y * torch.sigmoid(F.conv2d(a, t[f"attentions.{i}.conv2.weight"], padding=1))
        e = F.conv2d(y, t[f"conv_reduces.{i}.conv.weight"], t[f"conv_reduces.{i}.conv.bias"])
        outs.append(F.interpolate(e, (H, W), mode="bilinear", align_corners=False))
    outs.append(F.conv2d(torch.cat(outs, 1), t["classifier.weight"], t["classifier.bias"]))
    return torch.sigmoid(torch.cat(outs, 1)).permute(0, 2, 3, 1).numpy()


def test_odd_size_batch_matches_torch(golden, params, pdir):
    """Odd sizes exercise MaxPool2d's floor mode (45 -> 22 -> 11 -> 5) and the non-integer up-sampling."""
    pytest.importorskip("torch")
    import jax

    imgs = np.stack([golden["img0_uint8_hwc"][30:75, 100:167], golden["img1_uint8_hwc"][60:105, 10:77]])
    assert imgs.shape == (2, 45, 67, 3)
    maps = np.asarray(jax.jit(lambda p, x: PiDiNet().apply({"params": p}, preprocess_pidinet(x)))(params, imgs))
    assert maps.shape == (2, 45, 67, 5) and np.isfinite(maps).all()
    ref = _torch_pidinet(load_file(str(pdir / "table5_pidinet_converted.safetensors")),
                         np.asarray(preprocess_pidinet(imgs)).transpose(0, 3, 1, 2).copy())
    np.testing.assert_allclose(maps, ref, atol=MAPS_ATOL, rtol=0)
    # The batch is processed image by image (no cross-talk): the fuse map of image 1 alone is the same.
    alone = np.asarray(pidinet_edges(params, imgs[1:]))
    np.testing.assert_allclose(alone[0], maps[1, ..., 4], atol=1e-6, rtol=0)


def test_input_validation(sketcher):
    with pytest.raises(ValueError, match="uint8"):
        sketcher(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        sketcher(np.zeros((1, 16, 16, 4), np.uint8))

"""FID: the Flax FID Inception against a PyTorch reference, its weights loader, clean resizing, and the
Fréchet distance against closed forms.

The PyTorch reference (``tests/torch_fid_inception.py``) is our own plain-torch rebuild of pytorch-fid's
FID Inception (``pytorch_fid.inception`` needs torchvision, which does not work with the project's torch);
its ``state_dict()`` keys are those of ``pt_inception-2015-12-05-6726825d.pth``. It gets random weights
*and* random BatchNorm running statistics (the real checkpoint cannot be downloaded here).

Tolerances:
* pool3 features: max abs error <= 1e-4 x max |feature| (float32 through ~20 layers on CPU; measured
  ~4e-7 relative, 2.9e-6 absolute at a feature scale of ~6.4). For scale: dropping the [0,1] -> [-1,1]
  mapping moves the features by 1e-1 of that scale, ``count_include_pad=True`` by 3e-2, an average pool
  in Mixed_7c by 1e-1.
* Fréchet distance: float64 closed forms to 1e-8 relative (1e-6 absolute for identical statistics);
  the Gaussian-sample test to 0.2, about 5 standard deviations of the estimator at N = 20000, d = 3
  (measured 0.042 over 40 seeds).
* resize: the same PIL float operation, so exact up to float32 rounding of the final division (1e-6).
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from safetensors.numpy import save_file

from sketchcomp_jax.eval.fid import (
    FrechetDistanceError,
    InceptionFeatures,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    load_inception,
    load_statistics,
    resize_for_inception,
    save_statistics,
)
from sketchcomp_jax.weights.errors import CheckpointNotFoundError
from sketchcomp_jax.weights.inception_weights import (
    InceptionCheckpointError,
    expected_inception_shapes,
    inception_key_map,
    inception_variables_from_state_dict,
    is_ignored_inception_key,
    load_inception_variables,
)
from tests.torch_fid_inception import TorchFIDInception, randomize_

FEATURE_RTOL = 1e-4


# --------------------------------------------------------------------------------------------------
# Fixtures: one random reference network, its checkpoint files, one extractor
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> TorchFIDInception:
    torch.manual_seed(0)
    return randomize_(TorchFIDInception(), seed=0)


@pytest.fixture(scope="module")
def state_dict(reference) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def pth_path(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(reference.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def variables(pth_path):
    return load_inception_variables(pth_path)


@pytest.fixture(scope="module")
def extractor(variables) -> InceptionFeatures:
    return InceptionFeatures(variables, batch_size=2)


@pytest.fixture(scope="module")
def images01() -> np.ndarray:
    return np.random.default_rng(0).random((2, 299, 299, 3), dtype=np.float32)


@pytest.fixture(scope="module")
def torch_features(reference, images01) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(2.0 * images01 - 1.0).permute(0, 3, 1, 2)
        return reference(x).numpy().astype(np.float64)


def _assert_trees_equal(a, b, path=""):
    assert isinstance(a, dict) == isinstance(b, dict), path
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_trees_equal(a[k], b[k], f"{path}/{k}")
    else:
        assert a.dtype == b.dtype == np.float32, path
        np.testing.assert_array_equal(a, b, err_msg=path)


# --------------------------------------------------------------------------------------------------
# Network parity
# --------------------------------------------------------------------------------------------------


def test_key_map_equals_reference_state_dict(reference):
    sd = reference.state_dict()
    required = {k for k in sd if not is_ignored_inception_key(k)}
    assert required == set(inception_key_map())
    # The only keys left out are the classifier and the BN counters.
    ignored = set(sd) - required
    assert ignored == {"fc.weight", "fc.bias"} | {k for k in sd if k.endswith(".bn.num_batches_tracked")}
    shapes = expected_inception_shapes()
    assert {k: tuple(sd[k].shape) for k in required} == shapes
    assert len(shapes) == 94 * 5  # 94 BasicConv2d (conv + 4 BN tensors each)


def test_features_match_torch_reference(extractor, images01, torch_features):
    feats = extractor(images01)
    assert feats.shape == (2, 2048) and feats.dtype == np.float64
    scale = np.abs(torch_features).max()
    err = np.abs(feats - torch_features).max()
    assert err <= FEATURE_RTOL * scale, f"max abs error {err:.3g} at feature scale {scale:.3g}"
    # The random network still separates the two inputs well beyond the tolerance.
    assert np.abs(torch_features[0] - torch_features[1]).max() > 100 * FEATURE_RTOL * scale


def test_extractor_batches_and_resizes(extractor, images01):
    """3 uint8 images of another size with batch_size 2 (one full batch, one padded) equal the features
    of the pre-resized images computed in other batch compositions."""
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(3, 120, 100, 3), dtype=np.uint8)
    feats = extractor(imgs)
    resized = resize_for_inception(imgs)
    assert feats.shape == (3, 2048)
    np.testing.assert_allclose(feats[:2], extractor(resized[:2]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(feats[2], extractor(resized[[2, 0]])[0], rtol=0, atol=1e-6)
    # A stream whose last batch is shorter (padded to the compiled batch size) gives the same features.
    np.testing.assert_allclose(extractor.features_from_batches([imgs[:2], imgs[2:]]), feats, rtol=0, atol=1e-6)


def test_extractor_rejects_bad_inputs(extractor, variables):
    with pytest.raises(ValueError, match=r"\[-1, 1\] images: pass \(x \+ 1\) / 2"):
        extractor(np.full((1, 299, 299, 3), -0.5, np.float32))
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        extractor(np.zeros((1, 3, 299, 299), np.float32))
    with pytest.raises(ValueError, match="uint8 .* or float"):
        extractor(np.zeros((1, 299, 299, 3), np.int32))
    with pytest.raises(ValueError, match="'params', 'batch_stats'"):
        InceptionFeatures(variables["params"])


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def test_pth_and_safetensors_round_trip(variables, state_dict, tmp_path):
    # The explicit mapping, spot-checked on the last block: OIHW -> HWIO, BN stats in batch_stats.
    w = state_dict["Mixed_7c.branch3x3dbl_3b.conv.weight"]
    np.testing.assert_array_equal(
        variables["params"]["Mixed_7c"]["branch3x3dbl_3b"]["conv"]["kernel"], w.transpose(2, 3, 1, 0)
    )
    bn = "Mixed_5b.branch_pool.bn"
    affine = variables["params"]["Mixed_5b"]["branch_pool"]["bn"]
    np.testing.assert_array_equal(affine["scale"], state_dict[f"{bn}.weight"])
    np.testing.assert_array_equal(affine["bias"], state_dict[f"{bn}.bias"])
    stats = variables["batch_stats"]["Mixed_5b"]["branch_pool"]["bn"]
    np.testing.assert_array_equal(stats["mean"], state_dict[f"{bn}.running_mean"])
    np.testing.assert_array_equal(stats["var"], state_dict[f"{bn}.running_var"])

    # The same tensors as safetensors, without the optional keys, give the same variables.
    st = tmp_path / "fid_inception.safetensors"
    save_file({k: v for k, v in state_dict.items() if not is_ignored_inception_key(k)}, str(st))
    _assert_trees_equal(load_inception_variables(st), variables)
    _assert_trees_equal(load_inception(st), variables)  # the eval-side entry point reads the same
    # A float16 re-save is upcast to float32.
    half = inception_variables_from_state_dict({k: v.astype(np.float16) for k, v in state_dict.items()})
    assert half["params"]["Conv2d_1a_3x3"]["conv"]["kernel"].dtype == np.float32


def test_missing_key_is_named(state_dict, tmp_path):
    sd = dict(state_dict)
    del sd["Mixed_6c.branch7x7dbl_4.bn.running_var"]
    path = tmp_path / "missing.safetensors"
    save_file(sd, str(path))
    with pytest.raises(InceptionCheckpointError, match=r"missing keys: Mixed_6c\.branch7x7dbl_4\.bn\.running_var") as e:
        load_inception_variables(path)
    assert str(path) in str(e.value)


def test_wrong_shape_is_named(state_dict):
    sd = dict(state_dict)
    sd["Mixed_7b.branch3x3_2a.conv.weight"] = np.zeros((384, 384, 3, 1), np.float32)  # 3x1 instead of 1x3
    with pytest.raises(
        InceptionCheckpointError,
        match=r"Mixed_7b\.branch3x3_2a\.conv\.weight: \(384, 384, 3, 1\) \(expected \(384, 384, 1, 3\)\)",
    ):
        inception_variables_from_state_dict(sd)


def test_unexpected_keys_are_named_with_a_hint(state_dict):
    sd = dict(state_dict)
    sd["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    with pytest.raises(InceptionCheckpointError, match=r"unexpected keys: AuxLogits\.conv0\.conv\.weight.*ImageNet"):
        inception_variables_from_state_dict(sd, source="tv.pth")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        load_inception_variables(tmp_path / "pt_inception-2015-12-05-6726825d.pth")


# --------------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------------


def _spd(rng, d, floor=0.1):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + floor * np.eye(d)


def _fd_symmetric(mu1, s1, mu2, s2):
    """Independent reference: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), via symmetric eigh."""
    w, v = scipy.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = scipy.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(e, 0, None))))


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, s = rng.normal(size=64), _spd(rng, 64)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    d = 50
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_full_covariances_against_symmetric_formula():
    rng = np.random.default_rng(2)
    d = 32
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _spd(rng, d), _spd(rng, d)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_symmetric(mu1, s1, mu2, s2), rel=1e-8)
    # Generic in the dimension and symmetric in its arguments.
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-8)


def test_singular_product_uses_eps_offset(caplog):
    # Rank-deficient covariances whose product is not diagonalisable: sqrtm returns NaN without the offset.
    s1 = np.array([[5.0, -4.0, 0.0], [-4.0, 4.0, 0.0], [0.0, 0.0, 0.0]])
    s2 = np.array([[8.0, -4.0, 4.0], [-4.0, 2.0, -2.0], [4.0, -2.0, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        assert not np.isfinite(scipy.linalg.sqrtm(s1 @ s2)).all()
    mu = np.zeros(3)
    eps = 1e-6
    with caplog.at_level(logging.WARNING, logger="sketchcomp_jax.eval.fid"):
        got = frechet_distance(mu, s1, mu, s2, eps=eps)
    assert "singular covariance product" in caplog.text
    offset = eps * np.eye(3)
    # The offset changes the covariance traces by 2 * 3 * eps; compare on the offset matrices.
    expected = _fd_symmetric(mu, s1 + offset, mu, s2 + offset) - 6 * eps
    assert got == pytest.approx(expected, abs=1e-6)
    assert got == pytest.approx(_fd_symmetric(mu, s1, mu, s2), abs=1e-2)  # and near the exact value


def test_large_imaginary_part_raises():
    # Not covariances: (I)(-I) = -I has the square root i*I.
    with pytest.raises(FrechetDistanceError, match="imaginary"):
        frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), -np.eye(4))


def test_mismatched_statistics_raise():
    with pytest.raises(FrechetDistanceError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(FrechetDistanceError, match=r"mu must be \(D,\) and sigma \(D, D\)"):
        frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
    with pytest.raises(FrechetDistanceError, match="NaN"):
        frechet_distance(np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_statistics():
    rng = np.random.default_rng(3)
    f = rng.normal(size=(40, 5)).astype(np.float32)
    mu, sigma = feature_statistics(f)
    f64 = f.astype(np.float64)
    centred = f64 - f64.sum(0) / 40
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, f64.sum(0) / 40, rtol=1e-12)
    np.testing.assert_allclose(sigma, centred.T @ centred / 39, rtol=1e-12)  # unbiased (N - 1)
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(f[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        feature_statistics(f[0])


def test_samples_from_known_gaussians():
    rng = np.random.default_rng(4)
    d, n = 3, 20000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.25])
    s1, s2 = _spd(rng, d, floor=0.5), _spd(rng, d, floor=0.5)
    expected = _fd_symmetric(mu1, s1, mu2, s2)
    a = rng.multivariate_normal(mu1, s1, size=n)
    b = rng.multivariate_normal(mu2, s2, size=n)
    assert fid_from_features(a, b) == pytest.approx(expected, abs=0.2)
    assert abs(fid_from_features(a, rng.multivariate_normal(mu1, s1, size=n))) < 0.05


def test_statistics_file_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.normal(size=7), _spd(rng, 7)
    path = save_statistics(tmp_path / "ref_stats", mu, sigma)
    assert path.name == "ref_stats.npz" and path.is_file()
    mu2, sigma2 = load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    with pytest.raises(FileNotFoundError, match="no such statistics file"):
        load_statistics(tmp_path / "nope.npz")
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ValueError, match=r"needs arrays 'mu' and 'sigma', found \['mu'\]"):
        load_statistics(tmp_path / "bad.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=sigma[:3])
    with pytest.raises(ValueError, match="shape.npz"):
        load_statistics(tmp_path / "shape.npz")


# --------------------------------------------------------------------------------------------------
# Clean resizing
# --------------------------------------------------------------------------------------------------


def _pil_float_bicubic(plane: np.ndarray, size: int) -> np.ndarray:
    img = Image.frombytes("F", (plane.shape[1], plane.shape[0]), np.ascontiguousarray(plane, np.float32).tobytes())
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


@pytest.mark.parametrize("shape", [(2, 512, 384, 3), (1, 64, 80, 3)], ids=["down", "up"])
def test_resize_equals_pil_float_bicubic_uint8(shape):
    imgs = np.random.default_rng(6).integers(0, 256, size=shape, dtype=np.uint8)
    out = resize_for_inception(imgs)
    assert out.shape == (shape[0], 299, 299, 3) and out.dtype == np.float32
    for i in range(shape[0]):
        for c in range(3):
            ref = np.clip(_pil_float_bicubic(imgs[i, :, :, c].astype(np.float32), 299), 0, 255) / 255
            np.testing.assert_allclose(out[i, :, :, c], ref, rtol=0, atol=1e-6)


def test_resize_float_input_and_single_image():
    img = np.random.default_rng(7).random((200, 330, 3), dtype=np.float32)
    out = resize_for_inception(img)
    assert out.shape == (299, 299, 3)
    for c in range(3):
        ref = np.clip(_pil_float_bicubic(img[:, :, c], 299), 0, 1)
        np.testing.assert_allclose(out[:, :, c], ref, rtol=0, atol=1e-7)
    # Already 299x299: values pass through.
    same = np.random.default_rng(8).integers(0, 256, size=(1, 299, 299, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_for_inception(same), same.astype(np.float32) / 255)


def test_resize_is_antialiased():
    # A one-pixel checkerboard halved: antialiased resampling gives flat grey, point sampling would not.
    board = (np.indices((598, 598)).sum(0) % 2 * 255).astype(np.uint8)
    out = resize_for_inception(np.repeat(board[..., None], 3, axis=-1))
    assert np.abs(out - 0.5).max() < 0.02

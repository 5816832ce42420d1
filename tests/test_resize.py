"""The one bilinear resize (`ops.resize`) against `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False, antialias=False)`: every applier (JAX, numpy float, numpy uint8 + LUT), down- and
up-sampling, integer and non-integer factors, one-axis changes. Tolerance 2.5e-7 absolute on values in
[-1, 1]: two float32 ulp, the rounding-order freedom of a 4-term weighted sum (same coefficients)."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sketchcomp_jax.ops.resize import bilinear_axis, resize_bilinear, resize_bilinear_np, resize_u8_bilinear

SIZES = [
    ((512, 512), (64, 64)),    # the latent mask / sketch
    ((421, 300), (333, 517)),  # non-integer factors, down one axis and up the other
    ((7, 9), (64, 50)),        # large up-sampling (PiDiNet side outputs)
    ((100, 37), (30, 100)),
    ((64, 64), (512, 512)),
    ((33, 65), (33, 17)),      # one axis unchanged
    ((5, 5), (3, 3)),
    ((1, 4), (3, 9)),          # a single source row
]
ATOL = 2.5e-7


def _torch(x_nhwc: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=False).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("src, dst", SIZES)
def test_every_applier_matches_torch(src, dst):
    rng = np.random.default_rng(sum(src) + sum(dst))
    x = rng.uniform(-1, 1, (2,) + src + (3,)).astype(np.float32)
    ref = _torch(x, dst)
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(x), *dst)), ref, rtol=0, atol=ATOL)
    np.testing.assert_allclose(resize_bilinear_np(x[0], *dst), ref[0], rtol=0, atol=ATOL)
    u8 = rng.integers(0, 256, src + (3,), dtype=np.uint8)
    lut = (np.arange(256, dtype=np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(resize_u8_bilinear(u8, *dst, lut), _torch(lut[u8][None], dst)[0], rtol=0, atol=ATOL)


def test_fused_source_coordinate_rounding():
    """421 → 333: a separately rounded `scale·(dst+0.5)` is one ulp off for some pixels (what two of the
    three former implementations did); the fused one lands on PyTorch's indices and weights."""
    x = np.random.default_rng(1).uniform(-1, 1, (1, 421, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(x), 333, 1)), _torch(x, (333, 1)),
                               rtol=0, atol=ATOL)
    i0, i1, w0, w1 = bilinear_axis(421, 333)
    assert i0.dtype == np.int64 and w1.dtype == np.float32 and not w1.flags.writeable


def test_no_antialias_thin_lines_vanish():
    x = np.zeros((1, 16, 16, 1), np.float32)
    x[0, 3, :, 0] = 1.0  # read by 16→2 (rows 3, 4 are sampled)
    x[0, 9, :, 0] = 1.0  # not read (rows 11, 12 are)
    np.testing.assert_allclose(np.asarray(resize_bilinear(jnp.asarray(x), 2, 2))[0, :, :, 0], [[0.5, 0.5], [0, 0]])

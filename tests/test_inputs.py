"""Spatial conditioning: no-antialias bilinear resize (vs torch) and the sketch-in-hole rule (vs fixtures)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sketchcomp_jax.diffusion.inputs import latent_conditioning, sketch_for_input
from sketchcomp_jax.ops.resize import resize_bilinear as resize_bilinear_no_antialias


@pytest.mark.parametrize("src,dst", [((64, 64), (16, 16)), ((512, 512), (64, 64)), ((37, 50), (11, 23)), ((8, 8), (20, 13))])
def test_resize_matches_torch_interpolate(src, dst):
    x = np.random.default_rng(0).standard_normal((2, 3) + src).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False, antialias=False).numpy()
    ours = resize_bilinear_no_antialias(x.transpose(0, 2, 3, 1), *dst)
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_factor_eight_averages_centre_pixels():
    x = np.zeros((1, 16, 16, 1), np.float32)
    x[0, 3, :, 0] = 1.0  # a line on row 3 survives 16→2 (rows 3, 4 are sampled) ...
    x[0, 9, :, 0] = 1.0  # ... one on row 9 vanishes (rows 11, 12 are sampled)
    out = np.asarray(resize_bilinear_no_antialias(x, 2, 2))[0, :, :, 0]
    np.testing.assert_allclose(out, [[0.5, 0.5], [0.0, 0.0]])


def test_conditioning_matches_the_original_recipe(fixtures_dir):
    io = np.load(fixtures_dir / "plms_io.npz")
    nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    in_sketch = sketch_for_input(nhwc(io["sketch"]), nhwc(io["mask_keep"]))
    np.testing.assert_array_equal(np.asarray(in_sketch), nhwc(io["drop_in_sketch_pix"]))
    mask_lat, sketch_lat = latent_conditioning(nhwc(io["mask_keep"]), nhwc(io["sketch"]), (16, 16))
    np.testing.assert_allclose(np.asarray(mask_lat), nhwc(io["drop_mask_latent"]), atol=1e-7)
    np.testing.assert_allclose(np.asarray(sketch_lat), nhwc(io["drop_sketch_latent"]), atol=1e-6)
    assert set(np.unique(np.asarray(mask_lat))) <= {0.0, 0.25, 0.5, 0.75, 1.0}

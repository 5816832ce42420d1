"""The default `vae_encode="sample"` path (the original's `get_first_stage_encoding(encode(x)).sample()`).

1. Statistical: the masked-image latents the sampler receives are draws of `0.18215·(mean + std·N(0, 1))`,
   one per sample, around the posterior mean of the original (the e2e fixture's `posterior_mean`, computed by
   the PyTorch original): 512 draws, per-element mean within 5 standard errors, spread within 20 % per element
   and 2 % on average (5 standard errors of a sample std from 512 draws).
2. End to end with a fixed key: the pipeline's default call (no `vae_encode` given) is the sample path, is
   reproducible for a seed, changes with the seed, and moves the result
   away from the `mean` golden only by what the encoder noise explains (same noise, same sampler).
"""
import jax
import numpy as np

from sketchcomp_jax.models.vae import DiagonalGaussian

N = 512


def _inputs(pipe, e2e):
    return pipe.preprocess(e2e / "image.png", e2e / "mask.png", e2e / "sketch.png", e2e / "reference.png")


def test_masked_latents_are_posterior_draws(pipe, e2e):
    inputs = _inputs(pipe, e2e)
    golden = np.load(e2e / "expected.npz")
    scale = float(golden["scale_factor"])
    draws = np.asarray(pipe._spatial_condition(inputs, N, jax.random.PRNGKey(7)).z_masked)  # (N, h, w, 4)
    posterior = DiagonalGaussian(pipe._encode(pipe.params["vae"], inputs.image * inputs.keep_mask))
    std = scale * np.asarray(posterior.std)[0]
    mean_original = scale * golden["posterior_mean"][0].transpose(1, 2, 0)
    assert np.all(np.abs(draws.mean(0) - mean_original) <= 5 * std / np.sqrt(N) + 1e-5 * np.abs(mean_original).max())
    ratio = draws.std(0, ddof=1) / std
    assert np.all((ratio > 0.8) & (ratio < 1.2)) and abs(ratio.mean() - 1) < 0.02
    # Not a single draw broadcast: every sample has its own noise.
    assert not np.allclose(draws[0], draws[1])
    mean_path = np.asarray(pipe._spatial_condition(inputs, 2, None).z_masked)
    np.testing.assert_allclose(mean_path[0], mean_original, rtol=0, atol=1e-5 * np.abs(mean_original).max())


def test_default_call_samples_reproducibly_end_to_end(pipe, e2e):
    kwargs = dict(noise=np.load(e2e / "noise.npy"), steps=10, guidance_scale=5.0, sketch_drop_after=0.5,
                  sampler="plms")

    def run(**extra):
        return pipe(e2e / "image.png", e2e / "mask.png", e2e / "sketch.png", e2e / "reference.png", **kwargs, **extra)

    default = run(seed=3)
    again = run(seed=3, vae_encode="sample")
    np.testing.assert_array_equal(default.latents, again.latents)  # default = sample, fixed key → same result
    other = run(seed=4)
    assert not np.allclose(other.latents, default.latents)
    mean = run(seed=3, vae_encode="mean")
    assert np.all(np.isfinite(default.images01))
    # Same x_T and sampler: the difference comes from the encoder noise alone, so it is nonzero but of the
    # size of the change the noise makes between two seeds (not a broken path producing something else).
    d_mean = np.abs(default.latents - mean.latents).mean()
    d_seed = np.abs(default.latents - other.latents).mean()
    assert 0 < d_mean < 3 * d_seed

"""Fréchet Inception Distance: clean resizing, Inception pool3 features, Gaussian statistics, distance.

Pipeline (what :func:`fid_from_features` of two :class:`InceptionFeatures` outputs computes)::

    images (N, H, W, 3) uint8 or float in [0, 1]
      -> resize_for_inception     299x299, PIL bicubic with antialias per channel in float ("clean")
      -> 2 x - 1                  the [-1, 1] range of the FID Inception (pytorch-fid's normalisation)
      -> FIDInceptionV3           pool3 features (N, 2048), float32 on device, float64 on host
      -> feature_statistics       mean (2048,) and unbiased covariance (2048, 2048), float64
      -> frechet_distance         ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

Resizing follows clean-fid's "clean" mode (Parmar et al., "On Aliased Resizing and Surprising
Subtleties in GAN Evaluation", CVPR 2022): each channel is resized as a 32-bit float PIL image (mode
``"F"``) with ``Image.BICUBIC``, which PIL filters with a support widened by the down-scaling factor
(antialiasing), and nothing is quantised afterwards. pytorch-fid instead resizes inside the network
with ``F.interpolate(mode='bilinear')`` without antialias, which aliases when down-scaling; FIDs of the
two pipelines are not interchangeable. The network weights are the same TF-ported
``pt_inception-2015-12-05`` weights both tools use; clean-fid feeds them 0..255 pixels and normalises
with ``(x - 128) / 128`` where we (like pytorch-fid) use ``2 x / 255 - 1`` — a 0.4 % scale difference at
the input.

The statistics and the distance are generic over the feature dimension: the same functions compute
CLIP-FD (or any Fréchet distance between feature sets). ``mu``/``sigma`` ``.npz`` files use the keys of
pytorch-fid's ``--save-stats`` files, so reference statistics can be cached and exchanged.
"""
from __future__ import annotations

import logging
import os
import pathlib
import warnings
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from PIL import Image

from sketchcomp_jax.models.inception import FID_FEATURE_DIM, FID_INPUT_SIZE, FIDInceptionV3

__all__ = [
    "FrechetDistanceError",
    "InceptionFeatures",
    "RunningStatistics",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "load_inception",
    "load_statistics",
    "resize_for_inception",
    "save_statistics",
]

log = logging.getLogger(__name__)

# Images given as floats may overshoot [0, 1] by rounding (e.g. a decoder output clipped in float16).
_RANGE_SLACK = 1e-3


class FrechetDistanceError(ValueError):
    """The statistics cannot give a Fréchet distance (bad shapes, non-finite values, a large imaginary
    part in the matrix square root)."""


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def _as_batch(images: Any, what: str) -> tuple[np.ndarray, bool]:
    """(N, H, W, 3) array and whether a single (H, W, 3) image was given. Checks dtype and range."""
    x = np.asarray(images)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"{what}: expected NHWC RGB images of shape (N, H, W, 3) or one (H, W, 3) image, got {x.shape}; "
            "convert grayscale/RGBA to RGB (and NCHW to NHWC) first"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{what}: got an empty batch (0 images)")
    if x.dtype == np.uint8:
        return x, single
    if x.dtype.kind != "f":
        raise ValueError(f"{what}: images must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    lo, hi = float(np.min(x)), float(np.max(x))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{what}: images contain NaN or inf")
    if lo < -_RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        looks_signed = lo < -_RANGE_SLACK and hi <= 1 + _RANGE_SLACK
        hint = " (they look like [-1, 1] images: pass (x + 1) / 2)" if looks_signed else ""
        raise ValueError(f"{what}: float images must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")
    return x, single


def resize_for_inception(images: Any, size: int = FID_INPUT_SIZE) -> np.ndarray:
    """Clean resize to ``size x size`` for the FID Inception.

    ``images``: ``(N, H, W, 3)`` or ``(H, W, 3)``, uint8 (0..255) or float in [0, 1]. Returns float32
    in [0, 1] with the same rank, spatial size ``size x size``.

    Each channel of each image is resized as a float32 PIL image (mode ``"F"``) with
    ``Image.BICUBIC`` (antialiased when down-scaling; clean-fid's "clean" mode) and clipped to the
    input range. uint8 images are resized on their 0..255 values, exactly as clean-fid does, and then
    divided by 255. Images already ``size x size`` are only converted (PIL returns them unchanged).
    """
    x, single = _as_batch(images, "resize_for_inception")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    n, h, w, c = x.shape
    if (h, w) == (size, size):
        out = x.astype(np.float32)
    else:
        out = np.empty((n, size, size, c), np.float32)
        for i in range(n):
            for ch in range(c):
                plane = Image.fromarray(np.ascontiguousarray(x[i, :, :, ch], dtype=np.float32))  # mode "F"
                out[i, :, :, ch] = np.asarray(plane.resize((size, size), resample=Image.BICUBIC))
    # Bicubic overshoots at edges; the reference clips back to the pixel range.
    np.clip(out, 0.0, scale, out=out)
    if scale != 1.0:
        out /= np.float32(scale)
    return out[0] if single else out


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def load_inception(path: str | os.PathLike) -> dict:
    """The FID Inception variables ``{'params', 'batch_stats'}`` from ``pt_inception-2015-12-05-6726825d.pth``
    or a ``.safetensors`` re-save (see :func:`sketchcomp_jax.weights.inception_weights.load_inception_variables`,
    which raises clear ``CheckpointError``s for a wrong file)."""
    from sketchcomp_jax.weights.inception_weights import load_inception_variables

    return load_inception_variables(path)


class InceptionFeatures:
    """Jitted, batched FID Inception feature extractor.

    ``InceptionFeatures(variables)(images)`` -> ``(N, 2048)`` float64 numpy pool3 features, where
    ``variables`` is ``{'params', 'batch_stats'}`` of :class:`FIDInceptionV3` (see
    :func:`sketchcomp_jax.weights.inception_weights.load_inception_variables`, or
    :meth:`from_file`) and ``images`` is ``(N, H, W, 3)`` uint8 or float in [0, 1] of any size (resized
    on the host by :func:`resize_for_inception` unless already 299x299).

    Images go through the network ``batch_size`` at a time (fewer if ``N`` is smaller); a partial
    batch is zero-padded up to the largest batch size already compiled, so a stream of equal batches
    and its shorter last batch share one compiled program (features do not depend on the padding). The
    network runs in float32 with ``precision`` (default ``HIGHEST``: no TF32 / bf16 on GPU / TPU).
    """

    def __init__(self, variables: Any, *, batch_size: int = 50, precision: Any = jax.lax.Precision.HIGHEST):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(variables, Mapping) or set(variables) != {"params", "batch_stats"}:
            got = sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError(
                "InceptionFeatures needs the Flax variables {'params', 'batch_stats'} of FIDInceptionV3 "
                f"(load_inception_variables(path)), got {got}"
            )
        self.batch_size = batch_size
        self._compiled_bs = 0
        self.variables = jax.device_put(variables)
        model = FIDInceptionV3(precision=precision)

        def forward(v, x01):
            return model.apply(v, 2.0 * x01 - 1.0)  # [0, 1] -> [-1, 1], pytorch-fid's normalisation

        # Weights are an argument, not a closure constant, so they are not baked into the program.
        self._forward = jax.jit(forward)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> "InceptionFeatures":
        """Loads ``pt_inception-2015-12-05-6726825d.pth`` (or a ``.safetensors`` re-save) from ``path``."""
        return cls(load_inception(path), **kwargs)

    def __call__(self, images: Any) -> np.ndarray:
        x, _ = _as_batch(images, "InceptionFeatures")
        n = x.shape[0]
        # Pad small calls up to a batch size already compiled rather than compiling another program.
        bs = max(min(self.batch_size, n), self._compiled_bs)
        self._compiled_bs = bs
        out = np.empty((n, FID_FEATURE_DIM), np.float64)
        for start in range(0, n, bs):
            chunk = resize_for_inception(x[start : start + bs])  # per batch: 299^2 float32 is 1 MB/image
            real = chunk.shape[0]
            if real < bs:
                chunk = np.concatenate([chunk, np.zeros((bs - real,) + chunk.shape[1:], chunk.dtype)])
            feats = self._forward(self.variables, jnp.asarray(chunk))
            out[start : start + real] = np.asarray(feats, dtype=np.float64)[:real]
        return out

    def features_from_batches(self, batches: Iterable[Any]) -> np.ndarray:
        """Features of a stream of image batches (each as accepted by ``__call__``), concatenated."""
        feats = [self(b) for b in batches]
        if not feats:
            raise ValueError("features_from_batches: the iterable yielded no batches")
        return np.concatenate(feats, axis=0)


# --------------------------------------------------------------------------------------------------
# Statistics and distance (generic over the feature dimension)
# --------------------------------------------------------------------------------------------------


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """``features`` ``(N, D)`` -> ``(mu (D,), sigma (D, D))`` in float64: the mean and the unbiased
    (``N - 1``) covariance, as pytorch-fid and clean-fid compute them. Needs ``N >= 2``; with ``N <= D``
    the covariance is rank-deficient and the distance is biased high (a warning is logged)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"feature_statistics: expected features of shape (N, D), got {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"feature_statistics: need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("feature_statistics: features contain NaN or inf")
    if f.shape[0] <= f.shape[1]:
        log.warning(
            "feature_statistics: %d samples for %d-d features: the covariance is singular and the Fréchet "
            "distance is biased high; use more samples than dimensions for comparable numbers",
            f.shape[0], f.shape[1],
        )
    return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStatistics:
    """Mean and covariance of a stream of feature batches without keeping the features: O(D^2) memory
    for any number of samples.

    Keeps ``n``, the mean ``(D,)`` and the centred sum of outer products ``m2 (D, D)`` in float64 and
    combines each batch (or another accumulator, e.g. another host's) with the pairwise update of Chan,
    Golub & LeVeque (1979): ``m2 = m2_a + m2_b + (mean_b - mean_a)(mean_b - mean_a)^T n_a n_b / n``, which
    centres every batch on its own mean and so avoids the cancellation of raw sums of squares.
    :meth:`statistics` equals :func:`feature_statistics` of the concatenated features (the unbiased
    ``N - 1`` covariance) up to float64 rounding (~1e-15 relative).
    """

    def __init__(self, dim: int):
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    def update(self, features: Any) -> None:
        """Adds a batch ``(B, D)`` of feature vectors."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise ValueError(f"RunningStatistics: expected features (B, {self.mean.shape[0]}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("RunningStatistics: features contain NaN or inf")
        if f.shape[0] == 0:
            return
        mean = f.mean(axis=0)
        centred = f - mean
        self._combine(f.shape[0], mean, centred.T @ centred)

    def merge(self, other: "RunningStatistics") -> None:
        """Adds another accumulator's samples (e.g. one host's share)."""
        if other.n:
            self._combine(other.n, other.mean, other.m2)

    def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean
        self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.n = n

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu (D,), sigma (D, D))``: the mean and the unbiased covariance (as :func:`feature_statistics`)."""
        if self.n < 2:
            raise ValueError(f"RunningStatistics: need at least 2 feature vectors for a covariance, got {self.n}")
        if self.n <= self.mean.shape[0]:
            log.warning(
                "feature_statistics: %d samples for %d-d features: the covariance is singular and the Fréchet "
                "distance is biased high; use more samples than dimensions for comparable numbers",
                self.n, self.mean.shape[0],
            )
        return self.mean.copy(), self.m2 / (self.n - 1)

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """``{prefix_n, prefix_mean, prefix_m2}``: the state, for an ``.npz`` partial another process merges."""
        return {f"{prefix}_n": np.asarray(self.n), f"{prefix}_mean": self.mean, f"{prefix}_m2": self.m2}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], prefix: str) -> "RunningStatistics":
        mean = np.asarray(arrays[f"{prefix}_mean"], np.float64)
        out = cls(mean.shape[0])
        out.n, out.mean, out.m2 = int(arrays[f"{prefix}_n"]), mean, np.asarray(arrays[f"{prefix}_m2"], np.float64)
        return out


def _check_stats(mu: Any, sigma: Any, which: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FrechetDistanceError(
            f"statistics {which}: mu must be (D,) and sigma (D, D), got mu {mu.shape} and sigma {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FrechetDistanceError(f"statistics {which} contain NaN or inf")
    return mu, sigma


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        # "Matrix is singular": expected for rank-deficient covariances, handled by the caller.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64:

        ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))

    The matrix square root is ``scipy.linalg.sqrtm`` of the product, as in the reference
    implementations (TTUR, pytorch-fid, clean-fid): if the product is so singular that the square root
    is not finite, ``eps * I`` is added to both covariances and it is recomputed (a warning is logged);
    a complex result whose diagonal has an imaginary part within 1e-3 of 0 (rounding) is replaced by its
    real part, a larger one raises :class:`FrechetDistanceError`. Any feature dimension ``D``.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise FrechetDistanceError(f"the two statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("frechet_distance: singular covariance product; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise FrechetDistanceError(
                f"the square root of the covariance product is not finite even with {eps:g} added to the "
                "diagonals; check the statistics (enough samples? constant features?) or pass a larger eps"
            )
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FrechetDistanceError(
                f"the square root of the covariance product has a large imaginary part "
                f"(max |imag| {np.max(np.abs(covmean.imag)):.3g}): the covariances are not valid "
                "(not symmetric positive semi-definite?) or are badly conditioned; compute them with "
                "feature_statistics from more samples"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features_a: Any, features_b: Any) -> float:
    """Fréchet distance between two feature sets ``(N_a, D)`` and ``(N_b, D)`` (any ``D``)."""
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


# --------------------------------------------------------------------------------------------------
# Cached statistics
# --------------------------------------------------------------------------------------------------


def save_statistics(path: str | os.PathLike, mu: Any, sigma: Any) -> pathlib.Path:
    """Writes ``mu`` / ``sigma`` (float64) to an ``.npz`` (keys ``mu``, ``sigma``, as pytorch-fid's
    ``--save-stats``). ``.npz`` is appended if missing; returns the path written."""
    mu, sigma = _check_stats(mu, sigma, str(path))
    path = pathlib.Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)
    return path


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Reads ``(mu, sigma)`` from an ``.npz`` written by :func:`save_statistics` (or pytorch-fid)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such statistics file (write one with save_statistics)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, OSError, a pickled object refused, ...
        raise ValueError(f"{path}: not a readable .npz statistics file ({e})") from e
    if isinstance(loaded, np.ndarray):
        raise ValueError(f"{path}: a single .npy array, not an .npz with arrays 'mu' and 'sigma'")
    with loaded as z:
        arrays = {k: z[k] for k in z.files}
    if not {"mu", "sigma"} <= set(arrays):
        raise ValueError(f"{path}: a statistics file needs arrays 'mu' and 'sigma', found {sorted(arrays)}")
    # FrechetDistanceError (a ValueError) names the path if the shapes or values are wrong.
    return _check_stats(arrays["mu"], arrays["sigma"], str(path))

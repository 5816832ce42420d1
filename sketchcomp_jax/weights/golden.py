"""Comparison of a loaded model with the golden outputs of the original code (`tests/fixtures`)."""
from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp
import numpy as np

from sketchcomp_jax.models.config import build_networks
from sketchcomp_jax.models.vae import AutoencoderKL, decode_latent
from sketchcomp_jax.weights.model_dir import LoadedModel


def _nhwc(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).transpose(0, 2, 3, 1)


def _errors(ours, golden) -> tuple[float, float]:
    ours, golden = np.asarray(ours), np.asarray(golden)
    if ours.shape != golden.shape:
        raise ValueError(f"shape mismatch: ours {ours.shape} vs golden {golden.shape}")
    err = float(np.abs(ours - golden).max())
    return err, err / float(np.abs(golden).max())


def compare_with_goldens(model: LoadedModel, fixtures: str | os.PathLike) -> dict[str, tuple[float, float]]:
    """{component: (max abs error, error / max |golden|)} for `unet_io`, `vae_io` and `cond_io` goldens
    (inputs there are NCHW; the model is NHWC)."""
    fixtures = pathlib.Path(fixtures)
    nets = build_networks(model.config)
    out = {}
    io = np.load(fixtures / "unet_io.npz")
    eps = nets.unet.apply(
        {"params": model.params["unet"]}, jnp.asarray(_nhwc(io["x"])), jnp.asarray(io["timesteps"]),
        jnp.asarray(io["context"]),
    )
    out["unet eps"] = _errors(eps, _nhwc(io["eps"]))
    io = np.load(fixtures / "vae_io.npz")
    vae_vars = {"params": model.params["vae"]}
    moments = nets.vae.apply(vae_vars, jnp.asarray(_nhwc(io["image"])), method=AutoencoderKL.encode)
    out["vae encode (moments)"] = _errors(moments, _nhwc(io["moments"]))
    decoded = decode_latent(nets.vae, model.params["vae"], jnp.asarray(_nhwc(io["z_given"])), model.config.scale_factor)
    out["vae decode"] = _errors(decoded, _nhwc(io["decoded_given"]))
    io = np.load(fixtures / "cond_io.npz")
    context = nets.conditioner.apply({"params": model.params["conditioner"]}, jnp.asarray(_nhwc(io["pixel_values"])))
    out["conditioner context"] = _errors(context, io["context"])
    return out

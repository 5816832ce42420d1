"""Shared test set-up.

XLA_FLAGS must be set before JAX initialises so that the CPU exposes 8 devices (a simulated pod);
absl flags are marked parsed because grain workers read them.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES}: the tests need ../shared/fixtures beside the repo")
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_model_dir(fixtures_dir, tmp_path_factory) -> pathlib.Path:
    """pbs_tiny.ckpt converted exactly as the acceptance command does (original YAML + CLIP JSON, 64 px)."""
    from sketchcomp_jax.weights.model_dir import save_model_dir
    from sketchcomp_jax.weights.sources import convert_checkpoint

    model, source = convert_checkpoint(
        fixtures_dir / "pbs_tiny.ckpt",
        ldm_config=fixtures_dir / "pbs_tiny.yaml",
        clip_config=fixtures_dir / "pbs_tiny_clip_config.json",
        resolution=64,
    )
    return save_model_dir(tmp_path_factory.mktemp("models") / "pbs_tiny", model.config, model.params, source)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """The tiny model re-loaded from its model directory: (ModelConfig, params)."""
    from sketchcomp_jax.weights.model_dir import load_model

    return load_model(tiny_model_dir)

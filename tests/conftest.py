"""Shared test set-up.

XLA_FLAGS must be set before JAX initialises so that the CPU exposes 8 devices (a simulated pod);
absl flags are marked parsed because grain workers read them. JAX's persistent compilation cache
(`.jax_cache/`, gitignored; inherited by the subprocesses the tests start) lets the many runs of the same
tiny train step (resume, SIGTERM, restore, two processes) compile once.
"""
import os
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest
from absl import flags

flags.FLAGS.mark_as_parsed()

FIXTURES = REPO_ROOT / "tests" / "fixtures"  # the goldens of the original code (see its README.md)


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"golden fixtures not found at {FIXTURES}: they are part of the repository; restore them with git")
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


@pytest.fixture(scope="module")
def pipe(tiny_model):
    """A `SketchCompositionPipeline` over the tiny fixture model (module-scoped: it caches compiled samplers)."""
    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    return SketchCompositionPipeline(*tiny_model)


@pytest.fixture(scope="module")
def e2e(fixtures_dir):
    """The end-to-end golden folder (image, mask, sketch, reference, noise, expected.png)."""
    return fixtures_dir / "e2e"


def tiny_demo_config(data_dir, variant=None, **overrides):
    """`configs/demo.py` (`variant` as after `:`) shrunk for tests: a 24-image synthetic set made on first use
    in `data_dir`, 6 steps, a checkpoint every 3, no samples or eval. `overrides`: dotted config keys
    (`total_steps=…`, `optim.lr=…` as `**{"optim.lr": …}`)."""
    from configs.demo import get_config

    cfg = get_config(variant)
    cfg.data.dir = str(data_dir)
    cfg.data.synthetic_images = 24
    cfg.total_steps = 6
    cfg.log_every = 1
    cfg.checkpoint_every = 3
    cfg.sample_every = 0
    cfg.eval_every = 0
    cfg.optim.warmup_steps = 2
    for key, value in overrides.items():
        target = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return cfg


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory) -> pathlib.Path:
    """The tiny demo model: `configs/demo.py` trained for 2 steps on a 24-image synthetic set (a training work
    directory, which every model-taking tool accepts)."""
    from sketchcomp_jax.train.loop import train

    root = tmp_path_factory.mktemp("demo")
    train(tiny_demo_config(root / "data", total_steps=2, checkpoint_every=2), str(root / "run"))
    return root / "run"


CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by scripts/install_browser.sh (never a downloaded build)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by Playwright (the web-UI and notebook-canvas tests)."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `bash scripts/install_browser.sh` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()

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

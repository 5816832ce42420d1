"""The launch tools' logging: our INFO lines show, the libraries' INFO lines only with --library_logs."""
import logging

import pytest
from absl import logging as absl_logging

from sketchcomp_jax.cli_logging import configure_cli_logging


@pytest.fixture
def restore_levels():
    saved = {name: logging.getLogger(name).level for name in ("", "absl", "sketchcomp_jax")}
    saved_absl = absl_logging.get_verbosity()
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
    absl_logging.set_verbosity(saved_absl)


def _shown(logger: logging.Logger, level: int) -> bool:
    return logger.isEnabledFor(level)


@pytest.mark.parametrize("library_info", [False, True])
def test_levels(restore_levels, library_info):
    configure_cli_logging(library_info)
    ours = logging.getLogger("sketchcomp_jax.train.loop")
    # Orbax and TFDS log through absl's logger; JAX and grain through their own module loggers.
    libraries = [logging.getLogger("absl"), logging.getLogger("jax._src.xla_bridge"), logging.getLogger("grain")]
    assert _shown(ours, logging.INFO)
    for lib in libraries:
        assert _shown(lib, logging.WARNING), lib.name
        assert _shown(lib, logging.INFO) == library_info, lib.name


def test_library_info_dropped_ours_and_warnings_kept(restore_levels, capfd):
    """An absl INFO record (what Orbax emits around every save) is dropped; our own INFO and warnings pass."""
    configure_cli_logging(False)
    handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        absl_logging.info("orbax-like info line")
        absl_logging.warning("orbax-like warning line")
        logging.getLogger("sketchcomp_jax.train.loop").info("our info line")
    finally:
        root.removeHandler(handler)
    err = capfd.readouterr().err
    assert "orbax-like info line" not in err
    assert "orbax-like warning line" in err and "our info line" in err

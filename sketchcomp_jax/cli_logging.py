"""Logging set-up for the absl-based command-line tools (`launch/train.py`, `launch/prepare_data.py`).

Our own loggers (`sketchcomp_jax.*`) log at INFO; the libraries underneath (Orbax, TFDS, JAX, grain) log
only warnings and errors, unless `library_info=True`: Orbax alone writes ~50 INFO lines per checkpoint,
which would bury the tool's own messages.
"""
from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging

flags.DEFINE_bool("library_logs", False, "Also show the INFO logs of Orbax, TFDS, JAX and grain (warnings always show).")


def configure_cli_logging(library_info: bool = False) -> None:
    """Set the levels: INFO for `sketchcomp_jax.*`; INFO or WARNING for everything else (absl included)."""
    library_level = logging.INFO if library_info else logging.WARNING
    absl_logging.set_verbosity(absl_logging.INFO if library_info else absl_logging.WARNING)
    logging.getLogger().setLevel(library_level)
    logging.getLogger("sketchcomp_jax").setLevel(logging.INFO)

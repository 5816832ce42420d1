"""Console scripts (`sketchcomp-train`, `-sample`, `-convert`, `-export`, `-prepare-data`, `-evaluate`, `-app`,
`-check-model`; setup.py `entry_points`): each runs the matching `launch/<tool>.py` of this checkout as `__main__`,
so `sketchcomp-train --config=...` and `python launch/train.py --config=...` are the same program.

The scripts live in the repository, not in the package: the console scripts need the editable install that the
README uses (`pip install -e .`).
"""
from __future__ import annotations

import os
import pathlib
import runpy
import sys

LAUNCH_DIR = pathlib.Path(__file__).resolve().parents[1] / "launch"


def _run(tool: str) -> None:
    script = LAUNCH_DIR / f"{tool}.py"
    if not script.is_file():
        print(f"sketchcomp-{tool.replace('_', '-')}: error: {script} not found: the console scripts run the "
              "repository's launch/ scripts; install the package from its checkout with `pip install -e .`",
              file=sys.stderr)
        sys.exit(2)
    sys.argv[0] = os.fspath(script)  # absl and the scripts' messages name the tool by its file
    runpy.run_path(os.fspath(script), run_name="__main__")


def train() -> None:
    _run("train")


def sample() -> None:
    _run("sample")


def convert() -> None:
    _run("convert")


def export() -> None:
    _run("export")


def prepare_data() -> None:
    _run("prepare_data")


def evaluate() -> None:
    _run("evaluate")


def app() -> None:
    _run("app")


def check_model() -> None:
    _run("check_model")

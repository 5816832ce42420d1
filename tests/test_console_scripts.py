"""setup.py's console scripts (`sketchcomp-train`, ...) run the repository's launch/*.py as `__main__`."""
import re
import subprocess
import sys

from sketchcomp_jax import cli
from tests.conftest import REPO_ROOT


def _entry_points() -> dict[str, str]:
    """name -> function of `sketchcomp_jax.cli`, from the CONSOLE_SCRIPTS list in setup.py (evaluated as written)."""
    src = (REPO_ROOT / "setup.py").read_text()
    block = re.search(r"CONSOLE_SCRIPTS = \[.*?\n\]", src, re.S).group(0)
    scope: dict = {}
    exec(block, scope)  # noqa: S102 - our own setup.py
    return dict(e.split("=") for e in scope["CONSOLE_SCRIPTS"])


def test_every_console_script_has_its_launch_script():
    eps = _entry_points()
    want = {"sketchcomp-train", "sketchcomp-sample", "sketchcomp-convert", "sketchcomp-export",
            "sketchcomp-prepare-data", "sketchcomp-evaluate", "sketchcomp-app"}
    assert want <= set(eps)
    for name, target in eps.items():
        module, func = target.split(":")
        assert module == "sketchcomp_jax.cli" and callable(getattr(cli, func)), name
        assert (cli.LAUNCH_DIR / f"{func}.py").is_file(), name


def test_console_script_runs_the_launch_script():
    # The launch script's own flag parser answers (one line, exit 2), as for `python launch/sample.py --bogus`.
    proc = subprocess.run([sys.executable, "-c", "from sketchcomp_jax.cli import sample; sample()", "--bogus"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "sample.py: error: Unknown command line flag 'bogus' (see --helpshort)"

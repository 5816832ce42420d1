"""Check a model directory against the original's golden outputs (tests/fixtures of this repository).

    python launch/check_model.py --model runs/demo_model --fixtures tests/fixtures

Prints, per component (U-Net, VAE encode/decode, reference conditioner), the max abs error and
the error relative to the output scale; exits non-zero if any exceeds --rel_tol (default 1e-4).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory made by launch/convert.py.", required=True)
flags.DEFINE_string(
    "fixtures", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures"),
    "Folder with unet_io.npz, vae_io.npz, cond_io.npz (default: the repository's tests/fixtures).")
flags.DEFINE_float("rel_tol", 1e-4, "Allowed max |ours − golden| / max |golden|.")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C

    try:
        C.number("rel_tol", FLAGS.rel_tol, lo=0.0)
        C.input_dir("model", FLAGS.model, "model directory")
        C.input_dir("fixtures", FLAGS.fixtures, "fixtures folder")
    except C.UsageError as e:
        return C.report("check_model.py", e)
    from sketchcomp_jax.weights.golden import compare_with_goldens
    from sketchcomp_jax.weights.model_dir import load_model

    try:
        model = load_model(FLAGS.model)
    except (FileNotFoundError, ValueError) as e:
        return C.report("check_model.py", e)
    results = compare_with_goldens(model, FLAGS.fixtures)
    worst = 0.0
    for name, (abs_err, rel_err) in results.items():
        worst = max(worst, rel_err)
        print(f"{name:28s} max abs err {abs_err:.3e}   relative {rel_err:.3e}")
    ok = worst <= FLAGS.rel_tol
    print(("PASS" if ok else "FAIL") + f": worst relative error {worst:.2e} (tolerance {FLAGS.rel_tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

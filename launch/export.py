"""Export a model to PyTorch formats: the original's LDM .ckpt, a diffusers folder, or safetensors.

    python launch/export.py --model models/pbs --format ldm --out export/pbs.ckpt          # + pbs.yaml
    python launch/export.py --model models/pbs --format diffusers --out export/pbs_diffusers
    python launch/export.py --model models/pbs --format safetensors --dtype float16 --out export/pbs.safetensors

See docs/export.md for every flag and how to load each export.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (launch/convert.py output). Exclusive with --workdir.")
flags.DEFINE_string("workdir", None, "Training work directory (reads WORKDIR/checkpoints). Exclusive with --model.")
flags.DEFINE_integer("step", None, "With --workdir: the checkpoint step (default: the latest).")
flags.DEFINE_string("format", None, "ldm | diffusers | safetensors.", required=True)
flags.DEFINE_string("out", None, "Output: a .ckpt / .safetensors file, or a folder for --format diffusers.", required=True)
flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"], "Dtype of the floating tensors.")
flags.DEFINE_bool("include_ema", False, "Also export the EMA weights (error if the model has none).")
flags.DEFINE_bool("overwrite", False, "Replace existing output files / folder.")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C

    try:  # before JAX and any weights are loaded
        if FLAGS.format not in ("ldm", "diffusers", "safetensors"):
            raise C.UsageError(f"unknown export format {FLAGS.format!r}; choose one of ldm, diffusers, safetensors")
        if (FLAGS.model is None) == (FLAGS.workdir is None):
            raise C.UsageError("give exactly one of --model DIR or --workdir DIR")
        if FLAGS.model is not None:
            C.input_dir("model", FLAGS.model, "model directory")
        if FLAGS.workdir is not None:
            C.input_dir("workdir", FLAGS.workdir, "training work directory")
        C.number("step", FLAGS.step, lo=0, allow_none=True)
        # --out (exists, kind, companions, permissions) is checked by weights.export.check_output, also first.
    except C.UsageError as e:
        return C.report("export.py", e)
    from sketchcomp_jax.weights.errors import CheckpointError
    from sketchcomp_jax.weights.export import export

    try:
        written = export(
            FLAGS.out, FLAGS.format, model_dir=FLAGS.model, workdir=FLAGS.workdir, step=FLAGS.step,
            dtype=FLAGS.dtype, include_ema=FLAGS.include_ema, overwrite=FLAGS.overwrite,
        )
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, NotImplementedError, ValueError) as e:
        return C.report("export.py", e)
    print(f"wrote {FLAGS.format} export ({FLAGS.dtype}): " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

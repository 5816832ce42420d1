"""Train Paint-by-Sketch (see docs/train.md).

    python launch/train.py --config=configs/demo.py --workdir runs/demo
    python launch/train.py --config=configs/danbooru.py --workdir runs/pbs --config.init_from=models/pbe ...

Re-running with the same --workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from ml_collections import config_flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, samples/.", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C
    from sketchcomp_jax.train.config_checks import check_train_config

    try:  # before JAX, the data and the compilation
        cfg = FLAGS.config
        cfg.get("total_steps")  # a config file that failed to load raises here
        C.output_dir("workdir", FLAGS.workdir)
        check_train_config(cfg, FLAGS.workdir)
    except OSError as e:  # ml_collections' message lists every path it tried; the last line says why
        why = str(e).strip().splitlines()[-1].strip()
        return C.report("train.py", f"--config {FLAGS['config'].config_filename}: cannot load it ({why})")
    except C.UsageError as e:
        return C.report("train.py", e)
    from sketchcomp_jax.parallel.mesh import initialize_distributed
    from sketchcomp_jax.platform_check import report_backend
    from sketchcomp_jax.train.loop import TrainingDiverged, train

    d = cfg.distributed  # jax.distributed first: the backend report initialises JAX's backend
    initialize_distributed(d.coordinator or None, d.num_processes or None, None if d.process_id < 0 else d.process_id)
    report_backend("train.py")  # backend + device kind; warns when a TPU/GPU host runs jax on the CPU
    try:
        summary = train(cfg, FLAGS.workdir)
    except TrainingDiverged as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as e:
        return C.report("train.py", e)
    print(f"train.py: {summary['stop_reason']} at step {summary['step']}; last metrics {summary['last']}")
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

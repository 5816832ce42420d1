"""Local web UI: draw a mask and a sketch over an image, pick a reference, generate (see docs/app.md).

    python launch/app.py --model runs/demo [--step N --weights raw|ema] [--host 127.0.0.1 --port 7860 --share]

`--model` is a model directory (launch/convert.py output) or a training work directory (launch/train.py
--workdir; the latest checkpoint unless --step), opened with `SketchCompositionPipeline.from_pretrained`.
Open the printed URL in a browser.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Gradio reads these at import time: no telemetry, no update check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "runs/demo", "Model directory or training work directory (launch/train.py --workdir).")
flags.DEFINE_integer("step", None, "Training step to load (training work directory only; default: the latest).")
flags.DEFINE_enum("weights", None, ["raw", "ema"], "U-Net weights of a training run: raw (default) or its EMA copy.")
flags.DEFINE_bool("use_ema", False, "Same as --weights ema (kept for older command lines).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 to serve other machines).")
flags.DEFINE_integer("port", 7860, "Port to listen on.")
flags.DEFINE_bool("share", False, "Also open a public Gradio share link (sends traffic through gradio.live).")
flags.DEFINE_enum("sampler", "plms", ["plms", "ddim", "dpmpp"], "Default sampler in the UI.")
flags.DEFINE_integer("steps", 50, "Default number of steps in the UI.")
flags.DEFINE_enum("attention", None, ["auto", "xla", "chunked", "splash", "cudnn"],
                  "Attention backend (overrides the model's config.json; see docs/attention.md).")


def _weights() -> str | None:
    """--weights, with --use_ema as its older spelling of `--weights ema`."""
    from sketchcomp_jax.cli_checks import UsageError

    if FLAGS.use_ema and FLAGS.weights == "raw":
        raise UsageError("--use_ema and --weights raw contradict each other; give one of them")
    return "ema" if FLAGS.use_ema else FLAGS.weights


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C

    try:
        weights = _weights()
        C.number("step", FLAGS.step, lo=0, allow_none=True)
        C.number("port", FLAGS.port, lo=0, hi=65535)
        C.input_dir("model", FLAGS.model, "model directory")
    except C.UsageError as e:
        return C.report("app.py", e)

    from sketchcomp_jax.app.ui import Settings, launch

    try:
        launch(FLAGS.model, host=FLAGS.host, port=FLAGS.port, share=FLAGS.share, step=FLAGS.step,
               weights=weights, defaults=Settings(sampler=FLAGS.sampler, steps=FLAGS.steps),
               attention=FLAGS.attention)
    except (ValueError, FileNotFoundError) as e:
        return C.report("app.py", e)
    except OSError as e:  # e.g. the port is taken
        return C.report("app.py", f"cannot serve on {FLAGS.host}:{FLAGS.port} ({e}); pass another --port")
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

"""Local web UI: draw a mask and a sketch over an image, pick a reference, generate (see docs/app.md).

    python launch/app.py --model runs/demo [--host 127.0.0.1 --port 7860 --share]

`--model` is a model directory (launch/convert.py output) or a training work directory (launch/train.py
--workdir; the latest checkpoint). Open the printed URL in a browser.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Gradio reads these at import time: no telemetry, no update check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from absl import app, flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "runs/demo", "Model directory or training work directory (launch/train.py --workdir).")
flags.DEFINE_integer("step", None, "Training step to load (training work directory only; default: the latest).")
flags.DEFINE_bool("use_ema", False, "Use the EMA weights of a training run.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 to serve other machines).")
flags.DEFINE_integer("port", 7860, "Port to listen on.")
flags.DEFINE_bool("share", False, "Also open a public Gradio share link (sends traffic through gradio.live).")
flags.DEFINE_enum("sampler", "plms", ["plms", "ddim", "dpmpp"], "Default sampler in the UI.")
flags.DEFINE_integer("steps", 50, "Default number of steps in the UI.")
flags.DEFINE_enum("attention", None, ["auto", "xla", "chunked", "splash", "cudnn"],
                  "Attention backend (overrides the model's config.json; see docs/attention.md).")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax.app.ui import Settings, launch

    try:
        launch(FLAGS.model, host=FLAGS.host, port=FLAGS.port, share=FLAGS.share, step=FLAGS.step,
               use_ema=FLAGS.use_ema, defaults=Settings(sampler=FLAGS.sampler, steps=FLAGS.steps),
               attention=FLAGS.attention)
    except (ValueError, FileNotFoundError) as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the port is taken
        print(f"app.py: error: cannot serve on {FLAGS.host}:{FLAGS.port} ({e}); pass another --port", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

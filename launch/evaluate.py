"""Evaluate a model on a prepared dataset's test split (the paper's Table 1 protocol and more).

    python launch/evaluate.py --model models/pbs --data data/danbooru --split test --num 1000 --out results.json \
        [--inception_weights pt_inception-2015-12-05-6726825d.pth] [--clip_weights clip-vit-base-patch32/] \
        [--pidinet_weights table5_pidinet.pth]
    python launch/evaluate.py --samples generated/ --data data/danbooru --num 1000 --out results.json   # score only

See docs/evaluate.md for every flag and what each metric means.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (launch/convert.py, launch/export.py) or training work directory "
                    "(launch/train.py --workdir; parameters only), local or gs://.")
flags.DEFINE_integer("step", None, "With a training work directory: the checkpoint step (default: the latest).")
flags.DEFINE_enum("weights", None, ["raw", "ema"], "U-Net weights: raw or ema (default: a run's raw weights, or the "
                  "set a model directory holds).")
flags.DEFINE_string("data", None, "Prepared dataset directory (launch/prepare_data.py).", required=True)
flags.DEFINE_string("split", "test", "Dataset split.")
flags.DEFINE_integer("num", 0, "Number of records (the first N of the split); 0 = all.")
flags.DEFINE_string("out", None, "Results JSON path (a .md table is written beside it).", required=True)
flags.DEFINE_string("samples", None, "Folder of result PNGs named <record id>.png: cache for generated images "
                    "(resumable) or images made elsewhere to score. Default: <out stem>_samples/ beside --out.")
flags.DEFINE_integer("batch_size", 4, "Images generated per batch.")
flags.DEFINE_integer("seed", 0, "Seed of the initial noise and posterior samples (per record).")
flags.DEFINE_integer("data_seed", 0, "Seed of the fixed per-record evaluation masks.")
flags.DEFINE_enum("sampler", "plms", ["plms", "ddim", "dpmpp"], "Sampler.")
flags.DEFINE_integer("steps", 50, "Sampling steps.")
flags.DEFINE_enum("attention", None, ["auto", "xla", "chunked", "splash", "cudnn"],
                  "Attention backend (overrides the model's config.json; see docs/attention.md).")
flags.DEFINE_float("guidance_scale", 5.0, "Classifier-free guidance scale.")
flags.DEFINE_float("sketch_drop_after", 1.0, "Sketch plug-and-drop fraction (1.0 = sketch at every step).")
flags.DEFINE_float("drop_value", 0.0, "Value of the dropped sketch channels (0.0 as the original; -1 = no edge).")
flags.DEFINE_enum("vae_encode", "sample", ["sample", "mean"], "Masked-image latent: posterior sample or mean.")
flags.DEFINE_float("edge_tolerance", 2.0, "Sketch-fidelity match distance in pixels.")
flags.DEFINE_string("inception_weights", None, "FID Inception weights (pt_inception-2015-12-05-6726825d.pth); enables FID.")
flags.DEFINE_string("clip_weights", None, "transformers CLIP folder for CLIP-I / CLIP-FD (default: the model's own CLIP tower).")
flags.DEFINE_string("pidinet_weights", None, "PiDiNet weights for re-extracting edges on PiDiNet datasets.")
flags.DEFINE_bool("export_inputs", False, "Also write each record's image/mask/sketch/reference PNGs to <samples>/inputs/.")
flags.DEFINE_string("coordinator", None, "Multi-host without a cluster environment: host:port of process 0 (TPU pods "
                    "and SLURM are detected without it). Every host runs the same command with its --process_id.")
flags.DEFINE_integer("num_processes", None, "With --coordinator: the number of processes.")
flags.DEFINE_integer("process_id", None, "With --coordinator: this process's index, 0 … num_processes-1.")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C

    try:  # flags and paths, before JAX is imported and the model loaded (H17: sketchcomp_jax/cli_checks.py)
        C.number("num", FLAGS.num, lo=0)
        C.number("step", FLAGS.step, lo=0, allow_none=True)
        C.number("batch_size", FLAGS.batch_size, lo=1)
        C.number("steps", FLAGS.steps, lo=1, hi=1000)
        C.number("guidance_scale", FLAGS.guidance_scale)
        C.number("sketch_drop_after", FLAGS.sketch_drop_after, lo=0.0, hi=1.0)
        C.number("drop_value", FLAGS.drop_value, lo=-1.0, hi=1.0)
        C.number("edge_tolerance", FLAGS.edge_tolerance, lo=0.0)
        C.input_dir("data", FLAGS.data, "prepared dataset directory")
        if FLAGS.model is not None:
            C.input_dir("model", FLAGS.model, "model directory")
        for flag in ("inception_weights", "pidinet_weights"):
            if FLAGS[flag].value is not None:
                C.input_file(flag, FLAGS[flag].value, "weights file")
        # Re-running with the same --out resumes (the samples folder is the cache), so an existing results file
        # is replaced; a directory there, or a missing/unwritable folder, is refused.
        C.output_file("out", FLAGS.out, overwrite=True, create_parent=True, extensions=[".json"])
    except C.UsageError as e:
        return C.report("evaluate.py", e)
    from sketchcomp_jax.eval.evaluate import EvalSettings, evaluate, fix_malloc_mmap_threshold

    fix_malloc_mmap_threshold()  # steady host memory over thousands of batches (see its docstring)
    from sketchcomp_jax.weights.errors import CheckpointError

    if not FLAGS.model and not FLAGS.samples:
        print("evaluate.py: error: give --model (to generate) and/or --samples (images to score)", file=sys.stderr)
        return 2
    if (FLAGS.coordinator is None) != (FLAGS.num_processes is None) or (FLAGS.num_processes is None) != (
            FLAGS.process_id is None):
        print("evaluate.py: error: give all of --coordinator, --num_processes and --process_id, or none",
              file=sys.stderr)
        return 2
    import jax

    from sketchcomp_jax.parallel.mesh import initialize_distributed

    initialize_distributed(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    settings = EvalSettings(
        split=FLAGS.split, num=FLAGS.num, batch_size=FLAGS.batch_size, seed=FLAGS.seed, sampler=FLAGS.sampler,
        steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale, sketch_drop_after=FLAGS.sketch_drop_after,
        drop_value=FLAGS.drop_value, vae_encode=FLAGS.vae_encode, edge_tolerance=FLAGS.edge_tolerance,
        data_seed=FLAGS.data_seed, attention=FLAGS.attention, model_step=FLAGS.step, model_weights=FLAGS.weights,
    )
    try:
        results = evaluate(
            FLAGS.data, FLAGS.out, model_dir=FLAGS.model, samples_dir=FLAGS.samples, settings=settings,
            inception_weights=FLAGS.inception_weights, clip_weights=FLAGS.clip_weights,
            pidinet_weights=FLAGS.pidinet_weights, export_inputs=FLAGS.export_inputs,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:  # the other hosts only generated and scored their share
        from sketchcomp_jax.paths import expand

        print(expand(FLAGS.out).with_suffix(".md").read_text())
        print(f"wrote {FLAGS.out} ({results['num_images']} images, {results['generated_now']} generated now)")
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

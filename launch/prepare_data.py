"""Prepare training data: an image folder (or the synthetic cartoon set) → a TFDS dataset in ArrayRecord format.

    python launch/prepare_data.py --images data/danbooru/images --tags data/danbooru/txt --out data/danbooru_ds \
        --sketcher pidinet --pidinet_weights table5_pidinet.pth
    python launch/prepare_data.py --images my_cartoons --out data/cartoons --sketcher xdog
    python launch/prepare_data.py --synthetic 64 --out data/synth64            # procedural cartoons, exact sketches

Re-running an interrupted command resumes it. Read the result with
``tfds.builder_from_directory(OUT).as_data_source("train")`` or ``sketchcomp_jax.data.pipeline.make_train_loader``.
See docs/prepare_data.md for every flag and the record format.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("images", None, "Folder of images (searched recursively; jpg/jpeg/png/webp/bmp).")
flags.DEFINE_string("tags", None, "Folder of tag .txt files: <relative path>.txt or <stem>.txt per image.")
flags.DEFINE_string("out", None, "Output dataset directory (local, or gs://bucket/path).", required=True)
flags.DEFINE_enum("sketcher", "xdog", ["pidinet", "xdog"], "Sketch extractor: pidinet (the paper's) or xdog (no weights).")
flags.DEFINE_string("pidinet_weights", None, "PiDiNet weights (table5_pidinet.pth or .safetensors) for --sketcher pidinet.")
flags.DEFINE_float("test_fraction", 0.2, "Fraction of images in the test split (by a seeded hash of the file id).")
flags.DEFINE_integer("seed", 0, "Seed of the split hash (and of the synthetic scenes).")
flags.DEFINE_integer("max_side", 0, "Cap on the longer image side (Lanczos downscale); 0 (default) = native size, "
                     "as the original sketches and crops.")
flags.DEFINE_string("save_sketches", None, "Also write every sketch as a PNG under this folder.")
flags.DEFINE_integer("synthetic", None, "Instead of --images: write N procedural cartoon scenes with exact line art.")
flags.DEFINE_integer("size", 256, "Image size of the synthetic scenes.")
flags.DEFINE_integer("shard_size", 1000, "Images per ArrayRecord shard (the unit of resume).")
flags.DEFINE_integer("num_threads", None, "Threads for decoding/encoding (default min(8, cores)).")
flags.DEFINE_integer("pidinet_bucket", 0, "0 (default) = PiDiNet at each native size, the original's sketches; "
                     "N > 1 pads to multiples of N (fewer compilations, approximate: a few % of pixels differ).")
flags.DEFINE_integer("batch_size", 8, "PiDiNet batch size (images of one padded shape).")
flags.DEFINE_bool("overwrite", False, "Replace a different preparation found in --out.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C

    try:  # before TensorFlow/JAX are imported and any image is read
        C.number("test_fraction", FLAGS.test_fraction, lo=0.0, hi=1.0, hi_open=True)
        C.number("max_side", FLAGS.max_side, lo=0)
        C.number("shard_size", FLAGS.shard_size, lo=1)
        C.number("num_threads", FLAGS.num_threads, lo=1, allow_none=True)
        C.number("pidinet_bucket", FLAGS.pidinet_bucket, lo=0)
        C.number("batch_size", FLAGS.batch_size, lo=1)
        C.number("synthetic", FLAGS.synthetic, lo=1, allow_none=True)
        C.number("size", FLAGS.size, lo=32, hi=4096)
        if FLAGS.images is not None:
            C.input_dir("images", FLAGS.images, "folder of images")
        if FLAGS.tags is not None:
            C.input_dir("tags", FLAGS.tags, "folder of tag .txt files")
        if FLAGS.pidinet_weights is not None:
            C.input_file("pidinet_weights", FLAGS.pidinet_weights, "weights file")
        C.output_dir("out", FLAGS.out)
        if FLAGS.save_sketches is not None:
            C.output_dir("save_sketches", FLAGS.save_sketches)
    except C.UsageError as e:
        return C.report("prepare_data.py", e)
    from sketchcomp_jax.data import records

    try:
        if FLAGS.synthetic is not None:
            if FLAGS.images:
                raise ValueError("give either --images or --synthetic, not both")
            unused = [f"--{n}" for n in ("tags", "sketcher", "pidinet_weights", "max_side", "pidinet_bucket", "batch_size")
                      if FLAGS[n].present]
            if unused:
                raise ValueError(f"--synthetic draws its own exact line art at --size; {', '.join(unused)} do not apply to it")
            from sketchcomp_jax.data.synthetic import write_synthetic_dataset

            out = write_synthetic_dataset(
                FLAGS.out, FLAGS.synthetic, seed=FLAGS.seed, size=FLAGS.size, test_fraction=FLAGS.test_fraction,
                shard_size=FLAGS.shard_size, progress=FLAGS.progress, overwrite=FLAGS.overwrite,
            )
            if FLAGS.save_sketches:
                from sketchcomp_jax.data.prepare import export_sketches

                export_sketches(out, FLAGS.save_sketches)
            meta = records.dataset_metadata(out)
            print(f"dataset: {out}")
            for split, n in meta.get("num_examples", {}).items():
                print(f"  {split}: {n} examples")
            print("  sketcher: synthetic (exact line art)")
            return 0
        if not FLAGS.images:
            raise ValueError("give --images DIR (or --synthetic N)")
        from sketchcomp_jax.data.prepare import prepare_dataset

        summary = prepare_dataset(
            FLAGS.images, FLAGS.out, tags_dir=FLAGS.tags, sketcher=FLAGS.sketcher,
            pidinet_weights=FLAGS.pidinet_weights, test_fraction=FLAGS.test_fraction, seed=FLAGS.seed,
            max_side=FLAGS.max_side, save_sketches=FLAGS.save_sketches, shard_size=FLAGS.shard_size,
            num_threads=FLAGS.num_threads, pidinet_bucket=FLAGS.pidinet_bucket, batch_size=FLAGS.batch_size,
            overwrite=FLAGS.overwrite, progress=FLAGS.progress,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        return C.report("prepare_data.py", e)
    print(summary.text())
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

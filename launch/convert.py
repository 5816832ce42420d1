"""Convert original weights into a sketchcomp-jax model directory.

    python launch/convert.py --src model.ckpt --out models/pbe
    python launch/convert.py --src model.ckpt --in_channels 12 --out models/pbs_init   # PbE → PbS init
    python launch/convert.py --src pbs.ckpt --ldm_config v1_aesthetic_sketch_image.yaml --out models/pbs
    python launch/convert.py --src sd-v1-4.ckpt --clip_from clip-vit-large-patch14 --out models/pbe_init  # SD → PbE

See docs/convert.md for every flag.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("src", None, "LDM .ckpt, LDM-layout .safetensors, or a diffusers Paint-by-Example folder.", required=True)
flags.DEFINE_string("out", None, "Output model directory (config.json + Orbax params).", required=True)
flags.DEFINE_string("ldm_config", None, "The original's YAML config (e.g. v1_aesthetic_sketch_image.yaml): heads etc.")
flags.DEFINE_string("clip_config", None, "transformers CLIPVisionConfig JSON for a non-ViT-L/14 image encoder.")
flags.DEFINE_integer("resolution", 512, "Image size the model is used at (latent size = resolution / VAE factor).")
flags.DEFINE_integer("in_channels", None, "U-Net input channels; more than the checkpoint's appends zero channels (9→12: PbE→PbS).")
flags.DEFINE_enum("weights", None, ["raw", "ema"],
                  "U-Net weights of an LDM checkpoint with model_ema.* buffers: default follows the YAML's use_ema "
                  "(absent = True, LDM's default); raw | ema overrides.")
flags.DEFINE_string("clip_from", None,
                    "Stable Diffusion v1 → Paint-by-Example init: a transformers CLIPVisionModel/CLIPModel folder (or "
                    "weights file) for the vision tower; mapper, final LN, proj_out and the unconditional vector are "
                    "freshly initialised as the original; --in_channels 9 (default) or 12.")
flags.DEFINE_integer("init_seed", 0, "With --clip_from: seed of the fresh mapper / proj_out / unconditional vector.")
flags.DEFINE_bool("overwrite", False, "Replace an existing non-empty --out directory.")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax import cli_checks as C

    try:  # before any weights are read
        if not os.path.isdir(FLAGS.src):  # a folder is a diffusers pipeline, checked by the reader
            C.input_file("src", FLAGS.src, "checkpoint file")
        for flag in ("ldm_config", "clip_config"):
            if FLAGS[flag].value is not None:
                C.input_file(flag, FLAGS[flag].value)
        if FLAGS.clip_from is not None and not os.path.isdir(FLAGS.clip_from):
            C.input_file("clip_from", FLAGS.clip_from, "CLIP folder or weights file")
        C.number("resolution", FLAGS.resolution, lo=8, hi=8192)
        if FLAGS.resolution % 8:
            raise C.UsageError(f"--resolution={FLAGS.resolution} is not a multiple of 8 (the VAE's downsampling)")
        C.number("in_channels", FLAGS.in_channels, lo=1, allow_none=True)
        C.output_dir("out", FLAGS.out)
        if os.path.isdir(FLAGS.out) and os.listdir(FLAGS.out) and not FLAGS.overwrite:
            raise C.UsageError(f"--out {FLAGS.out} exists and is not empty; choose another --out or pass --overwrite")
    except C.UsageError as e:
        return C.report("convert.py", e)
    from sketchcomp_jax.models.unet import count_params
    from sketchcomp_jax.weights.errors import CheckpointError
    from sketchcomp_jax.weights.model_dir import save_model_dir
    from sketchcomp_jax.weights.sources import convert_checkpoint

    try:
        model, source = convert_checkpoint(
            FLAGS.src, FLAGS.ldm_config, FLAGS.clip_config, FLAGS.resolution, FLAGS.in_channels,
            weights=FLAGS.weights, clip_from=FLAGS.clip_from, init_seed=FLAGS.init_seed,
        )
        out = save_model_dir(FLAGS.out, model.config, model.params, source, overwrite=FLAGS.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, PermissionError, ValueError) as e:
        return C.report("convert.py", e)
    cfg = model.config
    counts = {name: count_params(p) for name, p in model.params.items()}
    print(
        f"wrote {out}: U-Net {cfg.unet.in_channels}→{cfg.unet.out_channels} channels "
        f"({counts['unet']:,} params), VAE ({counts['vae']:,}), conditioner ({counts['conditioner']:,}); "
        f"resolution {cfg.resolution}, latent {cfg.latent_size}; "
        f"U-Net weights: {source['weights']['unet_weights']} ({source['weights']['reason']})"
    )
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

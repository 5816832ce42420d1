"""Sample edited images: source + mask + sketch + reference → OUT.png (see docs/sample.md).

    python launch/sample.py --model runs/demo_model --image img.png --mask mask.png --sketch sketch.png \
        --reference ref.png --out out.png [--sampler plms --steps 50 --guidance_scale 5 --sketch_drop_after 1.0]
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (launch/convert.py output) or training work directory.",
                    required=True)
flags.DEFINE_string("image", None, "Source image (any size/mode).", required=True)
flags.DEFINE_string("mask", None, "Mask image: white = region to fill.", required=True)
flags.DEFINE_string("sketch", None, "Sketch image: white strokes on black (black-on-white is inverted).")
flags.DEFINE_string("reference", None, "Reference image (content for the hole). Or use --reference_box.")
flags.DEFINE_string("out", None, "Output PNG; with --num_samples N > 1, OUT_0.png … OUT_{N-1}.png.", required=True)
flags.DEFINE_enum("sampler", "plms", ["plms", "ddim", "dpmpp"], "Sampler (plms = the original's).")
flags.DEFINE_integer("steps", 50, "Sampling steps.")
flags.DEFINE_float("guidance_scale", 5.0, "Classifier-free guidance scale (1 = no guidance).")
flags.DEFINE_float("sketch_drop_after", 1.0, "Fraction f of the steps that see the sketch (plug-and-drop).")
flags.DEFINE_float("drop_value", 0.0, "Value of dropped sketch channels: 0.0 (original) or -1.0 ('no edge').")
flags.DEFINE_float("eta", 0.0, "DDIM eta (ddim only).")
flags.DEFINE_integer("seed", 0, "Random seed (noise and VAE posterior sample).")
flags.DEFINE_integer("num_samples", 1, "Number of samples.")
flags.DEFINE_string("noise", None, ".npy initial latent, NCHW (N, 4, h, w) as the PyTorch original.")
flags.DEFINE_enum("vae_encode", "sample", ["sample", "mean"], "Masked-image latent: posterior sample (original) or mean.")
flags.DEFINE_bool("paste_back", False, "Keep the source pixels outside the hole (feathered). Recommended.")
flags.DEFINE_string("reference_box", None, "x0,y0,x1,y1: crop the reference from the source (self-reference).")
flags.DEFINE_integer("self_reference_iterations", 0, "Re-sample k times with the hole crop of the result as reference.")
flags.DEFINE_string("prompt", None, "Text for a text-conditioned model (the Paint-by-T+S baseline), e.g. its tags.")
flags.DEFINE_bool("grid", False, "Also write OUT_grid.png with all samples side by side.")
flags.DEFINE_enum("attention", None, ["auto", "xla", "chunked", "splash", "cudnn"],
                  "Attention backend (overrides the model's config.json; see docs/attention.md).")


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    try:
        box = None
        if FLAGS.reference_box:
            box = [int(v) for v in FLAGS.reference_box.split(",")]
            if len(box) != 4:
                raise ValueError("--reference_box needs four integers x0,y0,x1,y1")
        if FLAGS.reference is None and box is None and FLAGS.prompt is None:
            raise ValueError("give --reference or --reference_box (or --prompt for a text-conditioned model)")
        noise = None
        if FLAGS.noise:
            try:
                noise = np.load(FLAGS.noise)
            except (OSError, ValueError) as e:
                raise ValueError(f"--noise {FLAGS.noise} is not a readable .npy file ({e})") from None
        out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
        if not os.path.isdir(out_dir):
            raise ValueError(f"output folder {out_dir} does not exist")
        with tqdm(total=3, desc="sample", unit="stage") as bar:
            bar.set_postfix_str("loading model")
            pipe = SketchCompositionPipeline.from_pretrained(FLAGS.model, attention=FLAGS.attention)
            bar.update()
            bar.set_postfix_str(f"{FLAGS.sampler} × {FLAGS.steps} steps (first call compiles)")
            result = pipe(
                FLAGS.image, FLAGS.mask, FLAGS.sketch, FLAGS.reference,
                num_samples=FLAGS.num_samples, seed=FLAGS.seed, noise=noise, sampler=FLAGS.sampler,
                steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale, sketch_drop_after=FLAGS.sketch_drop_after,
                drop_value=FLAGS.drop_value, eta=FLAGS.eta, vae_encode=FLAGS.vae_encode,
                paste_back=FLAGS.paste_back, reference_box=box,
                self_reference_iterations=FLAGS.self_reference_iterations, prompt=FLAGS.prompt,
            )
            bar.update()
            bar.set_postfix_str("writing")
            stem, ext = os.path.splitext(FLAGS.out)
            ext = ext or ".png"
            paths = [FLAGS.out] if len(result.images) == 1 else [f"{stem}_{i}{ext}" for i in range(len(result.images))]
            for img, path in zip(result.images, paths):
                img.save(path)
            if FLAGS.grid:
                w, h = result.images[0].size
                grid = Image.new("RGB", (w * len(result.images), h))
                for i, img in enumerate(result.images):
                    grid.paste(img, (i * w, 0))
                grid.save(f"{stem}_grid{ext}")
            bar.update()
    except (ValueError, FileNotFoundError) as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

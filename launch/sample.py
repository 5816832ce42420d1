"""Sample edited images: source + mask + sketch + reference → OUT.png (see docs/sample.md).

    python launch/sample.py --model runs/demo_model --image img.png --mask mask.png --sketch sketch.png \
        --reference ref.png --out out.png [--sampler plms --steps 50 --guidance_scale 5 --sketch_drop_after 1.0]

The model (a model directory, or a training work directory with --step/--weights) is opened with
`SketchCompositionPipeline.from_pretrained`.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from sketchcomp_jax.cli_logging import configure_cli_logging  # noqa: E402  (defines --library_logs)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Model directory (launch/convert.py output) or training work directory.",
                    required=True)
flags.DEFINE_integer("step", None, "Checkpoint step of a training work directory (default: the latest).")
flags.DEFINE_enum("weights", None, ["raw", "ema"],
                  "U-Net weights: raw or the EMA copy of a training run (default: raw; a model directory holds one set).")
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
flags.DEFINE_bool("overwrite", False, "Replace existing output files (default: refuse to touch them).")


def _output_paths(out: str, num_samples: int, grid: bool) -> tuple[list[str], str | None]:
    stem, ext = os.path.splitext(out)
    files = [out] if num_samples == 1 else [f"{stem}_{i}{ext}" for i in range(num_samples)]
    return files, (f"{stem}_grid{ext}" if grid else None)


def check_flags() -> dict:
    """Every flag and input file, checked before the model is loaded (seconds) and sampled (minutes).
    Returns the parsed extras: the reference box, the noise array, the output paths."""
    from PIL import Image

    from sketchcomp_jax import cli_checks as C
    from sketchcomp_jax import imageio, paths

    C.number("steps", FLAGS.steps, lo=1, hi=1000)
    C.number("guidance_scale", FLAGS.guidance_scale)
    C.number("sketch_drop_after", FLAGS.sketch_drop_after, lo=0.0, hi=1.0)
    C.number("drop_value", FLAGS.drop_value, lo=-1.0, hi=1.0)
    C.number("eta", FLAGS.eta, lo=0.0)
    C.number("num_samples", FLAGS.num_samples, lo=1)
    C.number("self_reference_iterations", FLAGS.self_reference_iterations, lo=0)
    C.number("step", FLAGS.step, lo=0, allow_none=True)
    box = C.parse_box("reference_box", FLAGS.reference_box) if FLAGS.reference_box else None
    if FLAGS.reference is None and box is None and FLAGS.prompt is None:
        raise C.UsageError("give --reference or --reference_box (or --prompt for a text-conditioned model)")
    model = C.input_dir("model", FLAGS.model, "model directory")
    # The same test as model_source.is_model_dir / is_training_workdir, without importing JAX.
    if not paths.is_remote(model) and not ((model / "config.json").is_file() or (model / "model_config.json").is_file()):
        raise C.UsageError(f"--model {model} is neither a model directory (config.json + params/, from "
                           "launch/convert.py) nor a training work directory (from launch/train.py)")
    if FLAGS.step is not None and not paths.is_remote(model) and (model / "config.json").is_file():
        raise C.UsageError(f"--step only applies to a training work directory; --model {model} is a model directory "
                           "(one set of weights): drop --step")
    try:
        size = imageio.image_size(FLAGS.image, "--image")
        for flag in ("mask", "sketch"):  # refused, not stretched: a mask drawn for another size is misplaced
            path = getattr(FLAGS, flag)
            if path is not None:
                other = imageio.image_size(path, f"--{flag}")
                if other != size:
                    raise C.UsageError(
                        f"--{flag} {path} is {other[0]}x{other[1]} but --image is {size[0]}x{size[1]}; draw or "
                        f"resize the {flag} to the image's size")
        if FLAGS.reference is not None:
            imageio.image_size(FLAGS.reference, "--reference")
        if box is not None:
            imageio.check_box(box, size, "--reference_box")
    except FileNotFoundError as e:
        raise C.UsageError(str(e)) from None
    noise = C.load_npy("noise", FLAGS.noise) if FLAGS.noise else None
    if noise is not None:
        _check_noise_shape(model, noise.shape, FLAGS.num_samples)
    files, grid = _output_paths(FLAGS.out, FLAGS.num_samples, FLAGS.grid)
    extensions = [e for e, fmt in Image.registered_extensions().items() if fmt in Image.SAVE]
    C.output_files("out", files + ([grid] if grid else []), overwrite=FLAGS.overwrite, extensions=extensions)
    return dict(box=box, noise=noise, files=files, grid=grid)


def _check_noise_shape(model, shape: tuple[int, ...], num_samples: int) -> None:
    """The pipeline's own noise-shape rule, applied before the model is loaded (from its JSON config)."""
    import json

    from sketchcomp_jax import cli_checks as C
    from sketchcomp_jax import paths

    if paths.is_remote(model):
        return
    name = "config.json" if (model / "config.json").is_file() else "model_config.json"
    try:
        cfg = json.loads((model / name).read_text())
        lat = int(cfg["resolution"]) // 2 ** (len(cfg["vae"]["ch_mult"]) - 1)
        expected = (int(cfg["unet"]["out_channels"]), lat, lat)
    except (OSError, ValueError, KeyError, TypeError):
        return  # an unreadable config is reported when the model is loaded
    if len(shape) != 4 or tuple(shape[1:]) != expected or shape[0] not in (1, num_samples):
        raise C.UsageError(
            f"--noise has shape {tuple(shape)}; this model needs NCHW (N, {expected[0]}, {expected[1]}, "
            f"{expected[2]}) with N = 1 or --num_samples={num_samples} (the PyTorch original's layout)")


def _save_all(images: dict) -> None:
    """Writes every picture ({path: PIL image}) to a hidden temporary sibling first and renames them into place only when all
    are written: an interrupted or failed run leaves none of the outputs half-written."""
    tmps = []
    try:
        for path, img in images.items():
            head, tail = os.path.split(path)
            tmp = os.path.join(head, f".{tail}.partial{os.path.splitext(tail)[1]}")
            tmps.append(tmp)
            img.save(tmp)
        for tmp, path in zip(tmps, images):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def main(argv):
    del argv
    configure_cli_logging(FLAGS.library_logs)
    from sketchcomp_jax.cli_checks import UsageError, report

    try:
        checked = check_flags()
    except (UsageError, ValueError) as e:
        return report("sample.py", e)

    from PIL import Image
    from tqdm import tqdm

    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    try:
        with tqdm(total=3, desc="sample", unit="stage") as bar:
            bar.set_postfix_str("loading model")
            pipe = SketchCompositionPipeline.from_pretrained(FLAGS.model, step=FLAGS.step, weights=FLAGS.weights,
                                                             attention=FLAGS.attention)
            bar.update()
            bar.set_postfix_str(f"{FLAGS.sampler} × {FLAGS.steps} steps (first call compiles)")
            result = pipe(
                FLAGS.image, FLAGS.mask, FLAGS.sketch, FLAGS.reference,
                num_samples=FLAGS.num_samples, seed=FLAGS.seed, noise=checked["noise"], sampler=FLAGS.sampler,
                steps=FLAGS.steps, guidance_scale=FLAGS.guidance_scale, sketch_drop_after=FLAGS.sketch_drop_after,
                drop_value=FLAGS.drop_value, eta=FLAGS.eta, vae_encode=FLAGS.vae_encode,
                paste_back=FLAGS.paste_back, reference_box=checked["box"],
                self_reference_iterations=FLAGS.self_reference_iterations, prompt=FLAGS.prompt,
            )
            bar.update()
            bar.set_postfix_str("writing")
            outputs = dict(zip(checked["files"], result.images))
            if checked["grid"]:
                w, h = result.images[0].size
                grid = Image.new("RGB", (w * len(result.images), h))
                for i, img in enumerate(result.images):
                    grid.paste(img, (i * w, 0))
                outputs[checked["grid"]] = grid
            _save_all(outputs)
            bar.update()
    except (ValueError, FileNotFoundError) as e:
        return report("sample.py", e)
    print("wrote " + ", ".join(outputs))
    return 0


if __name__ == "__main__":
    from sketchcomp_jax.cli_checks import run

    run(main)

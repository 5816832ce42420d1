"""The local web UI (Gradio): source image with a Mask layer and a Sketch layer, a reference, controls, results.

`launch/app.py` is the command line; everything testable is here:

* `editor_inputs(value)` turns the image editor's value ({'background', 'layers', 'composite'}) into the
  pipeline's source / mask / sketch (layer order = `LAYER_NAMES`; see `sketchcomp_jax.app.layers`);
* `generate(pipe, ...)` runs the pipeline on them with `Settings`;
* `build_demo(pipe)` lays out the page; `launch(model, ...)` loads a model and serves it.

The layers are drawn on the editor's canvas, which has the source image's pixel size whatever the
screen size (the browser scales the view, not the canvas), so the mask and sketch are aligned with
the source pixel for pixel.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Sequence

from PIL import Image

from sketchcomp_jax import imageio
from sketchcomp_jax.app import layers as layer_ops

log = logging.getLogger(__name__)

LAYER_NAMES = ("Mask", "Sketch")
REFERENCE_UPLOAD = "Reference image"
REFERENCE_BOX = "Box from the source (self-reference)"
SAMPLERS = ("plms", "ddim", "dpmpp")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sampling controls (meanings as in docs/sample.md)."""

    sampler: str = "plms"
    steps: int = 50
    guidance_scale: float = 5.0
    sketch_drop_after: float = 1.0
    seed: int = 0
    num_samples: int = 1
    paste_back: bool = True

    def checked(self) -> "Settings":
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if int(self.steps) < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")
        if not 0.0 <= float(self.sketch_drop_after) <= 1.0:
            raise ValueError(f"the sketch drop fraction must be in [0, 1], got {self.sketch_drop_after}")
        if int(self.num_samples) < 1:
            raise ValueError(f"num_samples must be ≥ 1, got {self.num_samples}")
        return dataclasses.replace(self, steps=int(self.steps), seed=int(self.seed), num_samples=int(self.num_samples),
                                   guidance_scale=float(self.guidance_scale),
                                   sketch_drop_after=float(self.sketch_drop_after), paste_back=bool(self.paste_back))


@dataclasses.dataclass
class EditorInputs:
    image: Image.Image  # RGB source
    mask: Image.Image | None  # L, 255 = fill
    sketch: Image.Image | None  # L, white strokes on black


def _image_of(value: Any, what: str) -> Image.Image | None:
    """A PIL image from what Gradio passes (PIL, ndarray, filepath) or an editor dict (its composite,
    else its background); None when empty."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("composite") if value.get("composite") is not None else value.get("background")
        if value is None:
            return None
    return imageio.load_image(value, what)


def editor_inputs(value: dict | None) -> EditorInputs:
    """The image editor's value → source (RGB), mask and sketch (None where the layer is empty).

    `value['layers']` holds one RGBA image per entry of `LAYER_NAMES`, each the source's size."""
    if not value or value.get("background") is None:
        raise ValueError("upload a source image first (drop it on the editor)")
    background = imageio.load_image(value["background"], "source image")
    image = imageio.to_rgb(background)
    layers = list(value.get("layers") or [])
    if len(layers) > len(LAYER_NAMES):
        raise ValueError(f"the editor sent {len(layers)} layers; expected {len(LAYER_NAMES)}: {', '.join(LAYER_NAMES)}")
    layers += [None] * (len(LAYER_NAMES) - len(layers))
    mask_layer, sketch_layer = layers
    mask = None if mask_layer is None else layer_ops.mask_from_layer(mask_layer, image.size)
    sketch = None if sketch_layer is None else layer_ops.sketch_from_layer(sketch_layer, image.size)
    return EditorInputs(image, mask, sketch)


def generate(
    pipe,
    editor_value: dict | None,
    reference_mode: str = REFERENCE_BOX,
    reference: Any = None,
    box: Sequence[Any] | str | None = None,
    settings: Settings = Settings(),
    mask_file: Any = None,
    sketch_file: Any = None,
) -> tuple[list[Image.Image], str]:
    """Runs `pipe` (a `SketchCompositionPipeline`) on the editor's content → (images at the source size,
    a one-line summary). `mask_file` / `sketch_file` (uploaded pictures, same conventions as the CLI)
    replace the drawn layers when given. Raises ValueError with a message for the user on bad input."""
    settings = settings.checked()
    inputs = editor_inputs(editor_value)
    mask_upload, sketch_upload = _image_of(mask_file, "mask file"), _image_of(sketch_file, "sketch file")
    mask = mask_upload if mask_upload is not None else inputs.mask
    sketch = sketch_upload if sketch_upload is not None else inputs.sketch
    if mask is None:
        raise ValueError(f"nothing to fill: paint the region to replace on the '{LAYER_NAMES[0]}' layer "
                         "(or upload a mask file, white = fill)")
    if mask.size != inputs.image.size:
        mask = mask.resize(inputs.image.size, Image.NEAREST)
    if sketch is not None and sketch.size != inputs.image.size:
        sketch = sketch.resize(inputs.image.size, Image.BILINEAR)
    ref_img, ref_box = None, None
    if reference_mode == REFERENCE_BOX:
        ref_box = layer_ops.parse_box(box, inputs.image.size)
        if ref_box is None:
            raise ValueError("give the reference box x0, y0, x1, y1 in source pixels (or switch to a reference image)")
    elif reference_mode == REFERENCE_UPLOAD:
        ref_img = _image_of(reference, "reference")
        if ref_img is None:
            raise ValueError("upload a reference image (or choose the box from the source)")
        ref_img = imageio.to_rgb(ref_img)
    else:
        raise ValueError(f"unknown reference mode {reference_mode!r}; use {REFERENCE_UPLOAD!r} or {REFERENCE_BOX!r}")
    result = pipe(
        inputs.image, mask, sketch, ref_img, reference_box=ref_box, sampler=settings.sampler, steps=settings.steps,
        guidance_scale=settings.guidance_scale, sketch_drop_after=settings.sketch_drop_after, seed=settings.seed,
        num_samples=settings.num_samples, paste_back=settings.paste_back,
    )
    w, h = inputs.image.size
    summary = (f"{len(result.images)} image(s), {w}x{h}, {settings.sampler} × {settings.steps} steps, guidance "
               f"{settings.guidance_scale:g}, sketch for the first {settings.sketch_drop_after:g} of the steps"
               f"{'' if sketch is not None else ' (no sketch drawn)'}, seed {settings.seed}")
    return result.images, summary


def _full_box(value: dict | None):
    """Reference box = the whole uploaded image (a starting point the user narrows)."""
    image = _image_of({"background": (value or {}).get("background")}, "source image")
    if image is None:
        return 0, 0, 0, 0
    return 0, 0, image.size[0], image.size[1]


def build_demo(pipe, title: str = "Sketch composition", model_description: str = "", defaults: Settings = Settings()):
    """The Gradio Blocks page around `pipe`. Element ids (for scripts and tests): `editor`, `reference`,
    `box_x0..box_y1`, `reference_mode`, `generate`, `gallery`, `status`."""
    import gradio as gr

    res = pipe.config.resolution
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(
            f"## {title}\n"
            f"{model_description + ' · ' if model_description else ''}model size {res}×{res} px (inputs of any size "
            "are resized for the model and the results resized back).\n\n"
            f"1. Drop the source image on the editor. 2. Pick the **{LAYER_NAMES[0]}** layer and paint the region to "
            f"replace. 3. Pick the **{LAYER_NAMES[1]}** layer and draw the new shape's lines (paint colour does not "
            "matter). 4. Choose a reference and press **Generate**."
        )
        with gr.Row():
            with gr.Column(scale=3):
                editor = gr.ImageEditor(
                    label="Source image · layers: Mask (region to fill), Sketch (strokes)",
                    type="pil", image_mode="RGBA", sources=("upload", "clipboard"), transforms=(),
                    layers=gr.LayerOptions(allow_additional_layers=False, layers=list(LAYER_NAMES)),
                    brush=gr.Brush(colors=["#ff2d55", "#1e90ff", "#000000", "#ffffff", "#34c759"],
                                   default_color="#ff2d55", color_mode="defaults"),
                    elem_id="editor", format="png",
                )
                with gr.Accordion("Or upload mask / sketch files instead of drawing", open=False):
                    with gr.Row():
                        mask_file = gr.Image(label="Mask file (white = fill)", type="pil", sources=("upload",),
                                             elem_id="mask_file")
                        sketch_file = gr.Image(label="Sketch file (white strokes on black)", type="pil",
                                               sources=("upload",), elem_id="sketch_file")
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="Results", columns=4, format="png", elem_id="gallery",
                                     object_fit="contain", preview=False, fit_columns=False)
            with gr.Column(scale=2):
                reference_mode = gr.Radio([REFERENCE_BOX, REFERENCE_UPLOAD], value=REFERENCE_BOX,
                                          label="Reference", elem_id="reference_mode")
                with gr.Row():
                    box = [gr.Number(label=name, value=0, precision=0, minimum=0, elem_id=f"box_{name}")
                           for name in ("x0", "y0", "x1", "y1")]
                reference = gr.ImageEditor(
                    label="Reference image (crop tool: keep the part to use)", type="pil", image_mode="RGB",
                    sources=("upload", "clipboard"), transforms=("crop",), brush=False, eraser=False, layers=False,
                    elem_id="reference", format="png",
                )
                copy_source = gr.Button("Use the source as the reference image (then crop it)", size="sm")
                sampler = gr.Dropdown(list(SAMPLERS), value=defaults.sampler, label="Sampler")
                steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps")
                guidance = gr.Slider(1.0, 15.0, value=defaults.guidance_scale, step=0.5, label="Guidance scale")
                drop = gr.Slider(0.0, 1.0, value=defaults.sketch_drop_after, step=0.05,
                                 label="Sketch drop: fraction of the steps that see the sketch")
                with gr.Row():
                    seed = gr.Number(value=defaults.seed, precision=0, label="Seed")
                    num_samples = gr.Slider(1, 8, value=defaults.num_samples, step=1, label="Samples")
                paste_back = gr.Checkbox(value=defaults.paste_back, label="Paste back (keep source pixels outside the hole)")
                run = gr.Button("Generate", variant="primary", elem_id="generate")

        def on_generate(editor_value, mask_value, sketch_value, mode, reference_value, x0, y0, x1, y1, sampler_value,
                        steps_value, guidance_value, drop_value, seed_value, samples_value, paste_value):
            settings = Settings(sampler_value, steps_value, guidance_value, drop_value, seed_value or 0, samples_value,
                                paste_value)
            try:
                images, summary = generate(pipe, editor_value, mode, reference_value, (x0, y0, x1, y1), settings,
                                           mask_value, sketch_value)
            except (ValueError, FileNotFoundError) as e:
                raise gr.Error(str(e)) from None
            return images, summary

        run.click(
            on_generate,
            inputs=[editor, mask_file, sketch_file, reference_mode, reference, *box, sampler, steps, guidance, drop,
                    seed, num_samples, paste_back],
            outputs=[gallery, status],
        )
        editor.upload(_full_box, inputs=editor, outputs=box)
        copy_source.click(lambda value: _image_of({"background": (value or {}).get("background")}, "source image"),
                          inputs=editor, outputs=reference)
    return demo


def launch(model: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False, step: int | None = None,
           weights: str | None = None, defaults: Settings = Settings(), attention: str | None = None) -> None:
    """Opens `model` (a model directory or a training work directory; `step`, `weights` and `attention` as
    `SketchCompositionPipeline.from_pretrained`) and serves the UI (blocks)."""
    # No telemetry or update checks: set before Gradio is imported.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from sketchcomp_jax.model_source import require_reference_model
    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    pipe = SketchCompositionPipeline.from_pretrained(model, step=step, weights=weights, attention=attention)
    require_reference_model(pipe.config, pipe.description)
    demo = build_demo(pipe, model_description=pipe.description, defaults=defaults)
    log.info("serving on http://%s:%d", host, port)
    demo.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=share,
                                                   show_error=True, ssr_mode=False, footer_links=[],
                                                   run_history=False)

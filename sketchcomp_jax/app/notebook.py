"""Notebook helpers for `notebooks/sampling.ipynb`: a drawing canvas that works in Colab and Jupyter,
sliders with a Generate button, image rows, and parameter overrides from the environment.

The canvas (`DrawingCanvas`) shows the source image with a Mask layer, a Sketch layer and a reference-box
tool (JavaScript in `canvas_js`). Its strokes come back to the kernel as RGBA layers:

* in Colab through `google.colab.output.register_callback` (no widget manager needed);
* elsewhere (Jupyter Notebook/Lab, VS Code) as an `anywidget` widget.

Nothing is drawn when the notebook runs headless (nbclient, CI): `DrawingCanvas.inputs()` then returns
the fallback inputs it was given, so "Run all" works everywhere.
"""
from __future__ import annotations

import base64
import dataclasses
import functools
import html
import io
import json
import os
import sys
import uuid
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from sketchcomp_jax.app import layers as layer_ops
from sketchcomp_jax.app.canvas_js import ANYWIDGET_ESM, CSS, colab_html
from sketchcomp_jax.app.ui import SAMPLERS, Settings

ENV_PREFIX = "SKETCHCOMP_"


def in_colab() -> bool:
    return "google.colab" in sys.modules


def env_overrides(params: Mapping[str, Any], prefix: str = ENV_PREFIX) -> dict[str, Any]:
    """`params` with each NAME replaced by the environment variable PREFIX+NAME when it is set, cast to
    the type of the default (bool: 1/true/yes/on; a None default keeps the string; "none" → None)."""
    out = dict(params)
    for name, default in params.items():
        raw = os.environ.get(prefix + name)
        if raw is None:
            continue
        if raw.strip().lower() == "none":
            out[name] = None
        elif isinstance(default, bool):
            out[name] = raw.strip().lower() in ("1", "true", "yes", "on")
        elif isinstance(default, int):
            out[name] = int(raw)
        elif isinstance(default, float):
            out[name] = float(raw)
        elif isinstance(default, (tuple, list)):
            out[name] = type(default)(type(default[0])(v) if default else v for v in raw.split(","))
        else:
            out[name] = raw
    return out


@dataclasses.dataclass
class CanvasInputs:
    image: Image.Image  # RGB source
    mask: Image.Image | None  # L, 255 = fill
    sketch: Image.Image | None  # L, white strokes on black
    reference_box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1), exclusive ends
    drawn: bool  # False when these are the fallback inputs (nothing was drawn or loaded)


@functools.lru_cache(maxsize=1)
def _widget_class():
    import anywidget
    import traitlets

    class SketchCanvasWidget(anywidget.AnyWidget):
        _esm = ANYWIDGET_ESM
        _css = CSS
        source = traitlets.Unicode("").tag(sync=True)
        mask = traitlets.Unicode("").tag(sync=True)
        sketch = traitlets.Unicode("").tag(sync=True)
        box = traitlets.List(traitlets.Int(), default_value=[]).tag(sync=True)
        brush = traitlets.Int(12).tag(sync=True)

    return SketchCanvasWidget


class DrawingCanvas:
    """Source image + Mask / Sketch layers + reference box, drawn in the notebook.

    `source` is the picture shown at first (the user may load another one with the canvas's "Load
    image" button). `inputs(fallback_mask=..., ...)` returns what was drawn, or the fallbacks when the
    source is unchanged and nothing was drawn (headless runs)."""

    FIELDS = ("source", "mask", "sketch", "box", "brush")

    def __init__(self, source: Image.Image, brush: int | None = None):
        source = source.convert("RGB")
        self._initial_source = layer_ops.encode_data_url(source)
        brush = brush or max(2, round(min(source.size) / 24))
        self._state: dict[str, Any] = {"source": self._initial_source, "mask": "", "sketch": "", "box": [],
                                       "brush": int(brush)}
        self._widget = None
        self.callback_name = f"sketchcomp_canvas_{uuid.uuid4().hex[:12]}"

    # ------------------------------------------------------------------ front ends
    def show(self):
        """Displays the canvas (Colab: HTML + kernel callback; elsewhere: an anywidget widget)."""
        from IPython.display import HTML, display

        if in_colab():
            from google.colab import output  # type: ignore[import-not-found]

            output.register_callback(self.callback_name, self.receive)
            element_id = "skc-" + self.callback_name
            display(HTML(colab_html(element_id, self.callback_name, json.dumps(self._state))))
        else:
            self._widget = _widget_class()(**self._state)
            display(self._widget)

    def receive(self, changes_json: str) -> None:
        """Kernel side of the Colab callback: `changes_json` is a JSON object of changed fields."""
        changes = json.loads(changes_json)
        unknown = set(changes) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"canvas sent unknown fields {sorted(unknown)}")
        self._state.update(changes)

    @property
    def state(self) -> dict[str, Any]:
        if self._widget is not None:
            return {name: getattr(self._widget, name) for name in self.FIELDS}
        return dict(self._state)

    # ------------------------------------------------------------------ reading back
    def inputs(self, fallback_mask: Image.Image | None = None, fallback_sketch: Image.Image | None = None,
               fallback_box: Sequence[int] | None = None) -> CanvasInputs:
        """Source, mask, sketch and reference box as drawn. When the source is the initial one and no
        mask was drawn, the fallbacks are used (and `drawn` is False); a sketch or box drawn without a
        mask is an error, as is a new source image without a mask."""
        st = self.state
        image = layer_ops.decode_data_url(st["source"], "canvas source").convert("RGB")
        mask = layer_ops.mask_from_layer(layer_ops.decode_data_url(st["mask"], "mask layer"), image.size) \
            if st["mask"] else None
        sketch = layer_ops.sketch_from_layer(layer_ops.decode_data_url(st["sketch"], "sketch layer"), image.size) \
            if st["sketch"] else None
        box = layer_ops.parse_box(st["box"], image.size) if st["box"] else None
        untouched = st["source"] == self._initial_source and mask is None and sketch is None and box is None
        if untouched and fallback_mask is not None:
            fb_box = layer_ops.parse_box(fallback_box, image.size) if fallback_box is not None else None
            return CanvasInputs(image, fallback_mask, fallback_sketch, fb_box, drawn=False)
        if mask is None:
            raise ValueError("nothing to fill: choose 'Mask' on the canvas and paint the region to replace")
        return CanvasInputs(image, mask, sketch, box, drawn=True)


class ControlPanel:
    """Sliders for the sampling settings and a Generate button (ipywidgets; works in Colab and Jupyter).

    `settings()` reads the current values; the button calls `on_generate(settings)` and shows its output
    (prints, displays) under the panel."""

    def __init__(self, defaults: Settings, on_generate: Callable[[Settings], Any] | None = None):
        import ipywidgets as w

        d = defaults.checked()
        style = {"description_width": "150px"}
        layout = w.Layout(width="460px")
        self.sampler = w.Dropdown(options=list(SAMPLERS), value=d.sampler, description="Sampler", style=style)
        self.steps = w.IntSlider(value=d.steps, min=1, max=100, description="Steps", style=style, layout=layout)
        self.guidance = w.FloatSlider(value=d.guidance_scale, min=1.0, max=15.0, step=0.5, description="Guidance scale",
                                      style=style, layout=layout)
        self.drop = w.FloatSlider(value=d.sketch_drop_after, min=0.0, max=1.0, step=0.05,
                                  description="Sketch drop fraction", style=style, layout=layout)
        self.seed = w.IntText(value=d.seed, description="Seed", style=style)
        self.num_samples = w.IntSlider(value=d.num_samples, min=1, max=8, description="Samples", style=style,
                                       layout=layout)
        self.paste_back = w.Checkbox(value=d.paste_back, description="Paste back outside the hole", style=style)
        self.button = w.Button(description="Generate", button_style="primary")
        self.output = w.Output()
        self._on_generate = on_generate
        self.button.on_click(self._clicked)
        self.widget = w.VBox([self.sampler, self.steps, self.guidance, self.drop, self.seed, self.num_samples,
                              self.paste_back, self.button, self.output])

    def settings(self) -> Settings:
        return Settings(self.sampler.value, self.steps.value, self.guidance.value, self.drop.value, self.seed.value,
                        self.num_samples.value, self.paste_back.value).checked()

    def _clicked(self, _button) -> None:
        self.output.clear_output()
        with self.output:
            if self._on_generate is not None:
                self._on_generate(self.settings())

    def show(self) -> None:
        from IPython.display import display

        display(self.widget)


def images_html(images: Sequence[Image.Image], captions: Sequence[str] | None = None, width: int = 192) -> str:
    """One row of images with captions, as self-contained HTML (inline PNGs)."""
    captions = list(captions) if captions is not None else [""] * len(images)
    cells = []
    for img, cap in zip(images, captions):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        cells.append(
            f'<figure style="margin:4px;text-align:center"><img src="{src}" width="{width}" '
            f'style="image-rendering:pixelated"><figcaption>{html.escape(cap)}</figcaption></figure>'
        )
    return '<div style="display:flex;flex-wrap:wrap">' + "".join(cells) + "</div>"


def show_images(images: Sequence[Image.Image], captions: Sequence[str] | None = None, width: int = 192) -> None:
    from IPython.display import HTML, display

    display(HTML(images_html(images, captions, width)))

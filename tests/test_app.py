"""The web UI: editor layers → mask/sketch conversion, `generate` on the tiny model, and the real app in a
headless Chromium (Playwright) — upload, draw on the Mask and Sketch layers, set the reference box,
Generate, read the image back from the gallery."""
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from sketchcomp_jax import imageio
from sketchcomp_jax.app import layers as L
from sketchcomp_jax.app.examples import example_inputs
from sketchcomp_jax.app.ui import REFERENCE_BOX, REFERENCE_UPLOAD, Settings, editor_inputs, generate

from tests.conftest import REPO_ROOT

FAST = Settings(sampler="ddim", steps=4, guidance_scale=5.0, seed=3, paste_back=True)


def rgba_layer(paint: np.ndarray, rgb=(255, 45, 85), alpha: int = 255) -> Image.Image:
    """A transparent layer, painted (colour `rgb`, opacity `alpha`) where `paint` is True."""
    arr = np.zeros(paint.shape + (4,), np.uint8)
    arr[paint] = (*rgb, alpha)
    return Image.fromarray(arr, "RGBA")


def editor_value(ex, mask_paint=None, sketch_paint=None):
    size = ex.image.size[::-1]
    mask_paint = np.asarray(ex.mask) > 0 if mask_paint is None else mask_paint
    sketch_paint = np.asarray(ex.sketch) > 0 if sketch_paint is None else sketch_paint
    # Colours differ on purpose: only where paint is matters.
    return {"background": ex.image.convert("RGBA"),
            "layers": [rgba_layer(mask_paint, (0, 0, 0)), rgba_layer(sketch_paint, (30, 107, 255))],
            "composite": None, "size": size}


# ---------------------------------------------------------------------------------------------- layers
def test_painted_pixels_uses_alpha_not_colour():
    alpha = np.array([[0, 127, 128, 255]], np.uint8)
    rgba = np.zeros((1, 4, 4), np.uint8)
    rgba[..., 3] = alpha
    rgba[0, 0, :3] = 255  # colour under a transparent pixel: ignored
    rgba[0, 3, :3] = 0  # black opaque paint: painted
    np.testing.assert_array_equal(L.painted_pixels(rgba), [[False, False, True, True]])
    # Without alpha: bright paint on black counts.
    np.testing.assert_array_equal(L.painted_pixels(np.array([[0, 127, 128, 255]], np.uint8)), [[False, False, True, True]])


def test_mask_and_sketch_follow_the_pipeline_conventions():
    paint = np.zeros((40, 60), bool)
    paint[10:20, 5:25] = True
    mask = L.mask_from_layer(rgba_layer(paint, (0, 0, 0)))
    sketch = L.sketch_from_layer(rgba_layer(paint, (0, 0, 0)))
    assert mask.mode == "L" and mask.size == (60, 40)
    np.testing.assert_array_equal(np.asarray(mask), np.where(paint, 255, 0))
    np.testing.assert_array_equal(np.asarray(sketch), np.where(paint, 255, 0))
    # What the pipeline makes of them: keep = 0 in the painted region (white = fill) ...
    keep = imageio.keep_mask_from_image(mask, (60, 40))[..., 0]
    np.testing.assert_array_equal(keep, np.where(paint, 0.0, 1.0))
    # ... and +1 strokes on −1 (no black-on-white inversion of a sparse sketch).
    sk = imageio.sketch_from_image(sketch, (60, 40))
    np.testing.assert_array_equal(sk[..., 0], np.where(paint, 1.0, -1.0))
    assert L.mask_from_layer(rgba_layer(np.zeros((8, 8), bool))) is None
    assert L.sketch_from_layer(rgba_layer(np.zeros((8, 8), bool))) is None


def test_layer_size_must_match_the_source():
    paint = np.zeros((20, 30), bool)
    paint[5:10, 5:10] = True
    doubled = L.mask_from_layer(rgba_layer(paint), size=(60, 40))  # same aspect: rescaled
    assert doubled.size == (60, 40) and np.asarray(doubled)[10:20, 10:20].min() == 255
    assert np.asarray(doubled).sum() == 255 * 100
    with pytest.raises(ValueError, match="aspect ratio"):
        L.mask_from_layer(rgba_layer(paint), size=(30, 30))


def test_data_urls_and_boxes():
    img = rgba_layer(np.eye(5, dtype=bool))
    back = L.decode_data_url(L.encode_data_url(img))
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
    assert L.decode_data_url("") is None
    with pytest.raises(ValueError, match="data URL"):
        L.decode_data_url("http://example.com/x.png")
    assert L.parse_box("1, 2, 30, 40", (64, 64)) == (1, 2, 30, 40)
    assert L.parse_box([0, 0, 0, 0], (64, 64)) is None and L.parse_box(None, (64, 64)) is None
    with pytest.raises(ValueError, match="not inside the 64x64"):
        L.parse_box((10, 10, 80, 20), (64, 64))
    with pytest.raises(ValueError, match="four numbers"):
        L.parse_box("1,2,3", (64, 64))


def test_editor_inputs_splits_the_layers():
    ex = example_inputs(96)
    inputs = editor_inputs(editor_value(ex))
    assert inputs.image.mode == "RGB" and inputs.image.size == (96, 96)
    np.testing.assert_array_equal(np.asarray(inputs.image), np.asarray(ex.image))
    np.testing.assert_array_equal(np.asarray(inputs.mask), np.asarray(ex.mask))
    np.testing.assert_array_equal(np.asarray(inputs.sketch), np.asarray(ex.sketch))
    empty = editor_value(ex, sketch_paint=np.zeros((96, 96), bool))
    assert editor_inputs(empty).sketch is None
    with pytest.raises(ValueError, match="upload a source image"):
        editor_inputs({"background": None, "layers": []})
    with pytest.raises(ValueError, match="expected 2"):
        editor_inputs({**editor_value(ex), "layers": [None, None, None]})


# ---------------------------------------------------------------------------------------------- generate
@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    return SketchCompositionPipeline.from_pretrained(tiny_model_dir)  # as launch/app.py opens it


def test_generate_matches_the_pipeline_on_the_same_inputs(pipe):
    """Drawn layers give exactly what the mask/sketch pictures give through the Python API."""
    ex = example_inputs(96)
    images, summary = generate(pipe, editor_value(ex), REFERENCE_BOX, None, ex.reference_box, FAST)
    direct = pipe(ex.image, ex.mask, ex.sketch, None, reference_box=ex.reference_box, sampler="ddim", steps=4,
                  seed=3, paste_back=True)
    assert len(images) == 1 and images[0].size == (96, 96)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(direct.images[0]))
    assert "ddim × 4 steps" in summary
    # Paste-back: far from the hole the source is untouched; inside it the model painted something else.
    out, src = np.asarray(images[0]).astype(int), np.asarray(ex.image).astype(int)
    x0, y0, x1, y1 = ex.reference_box
    assert np.array_equal(out[:y0 - 8], src[:y0 - 8])
    assert np.abs(out[y0 + 8:y1 - 8, x0 + 8:x1 - 8] - src[y0 + 8:y1 - 8, x0 + 8:x1 - 8]).mean() > 5


def test_generate_with_an_uploaded_reference_and_mask_file(pipe):
    ex = example_inputs(96)
    reference = Image.fromarray(np.full((40, 30, 3), (200, 40, 90), np.uint8))
    no_mask = editor_value(ex, mask_paint=np.zeros((96, 96), bool))
    images, _ = generate(pipe, no_mask, REFERENCE_UPLOAD, {"background": reference, "composite": reference},
                         None, FAST, mask_file=ex.mask)
    direct = pipe(ex.image, ex.mask, ex.sketch, reference, sampler="ddim", steps=4, seed=3, paste_back=True)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(direct.images[0]))


def test_generate_reports_user_errors(pipe):
    ex = example_inputs(96)
    with pytest.raises(ValueError, match="paint the region"):
        generate(pipe, editor_value(ex, mask_paint=np.zeros((96, 96), bool)), REFERENCE_BOX, None, (0, 0, 9, 9), FAST)
    with pytest.raises(ValueError, match="not inside"):
        generate(pipe, editor_value(ex), REFERENCE_BOX, None, (0, 0, 200, 9), FAST)
    with pytest.raises(ValueError, match="give the reference box"):
        generate(pipe, editor_value(ex), REFERENCE_BOX, None, (0, 0, 0, 0), FAST)
    with pytest.raises(ValueError, match="upload a reference image"):
        generate(pipe, editor_value(ex), REFERENCE_UPLOAD, None, None, FAST)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(pipe, editor_value(ex), REFERENCE_BOX, None, ex.reference_box, Settings(sampler="euler"))


# ---------------------------------------------------------------------------------------------- browser
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    """launch/app.py on a free localhost port, in its own process (as a user starts it)."""
    port = _free_port()
    tmp = tmp_path_factory.mktemp("gradio")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HUB_OFFLINE": "1", "GRADIO_TEMP_DIR": str(tmp), "JAX_PLATFORMS": "cpu"}
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "launch" / "app.py"), f"--model={tiny_model_dir}", f"--port={port}",
         "--sampler=ddim", "--steps=4"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"launch/app.py did not start: {(tmp / 'app.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _draw_and_generate(page, url, src_path, mask_points, sketch_points, box):
    """Uploads `src_path`, paints `mask_points` on the Mask layer and `sketch_points` on the Sketch layer
    (source pixel coordinates), sets the reference box, generates; returns the first gallery image."""
    page.goto(url, wait_until="networkidle")
    page.locator("#editor input[type=file]").set_input_files(str(src_path))
    w, h = Image.open(src_path).size
    # Uploading fills the reference box with the whole image.
    page.wait_for_function(f"document.querySelector('#box_x1 input').value == '{w}'", timeout=20000)
    zoom = float(page.locator("#editor .zoom-number").inner_text().strip().rstrip("%")) / 100
    rect = page.locator("#editor .pixi-target canvas").bounding_box()
    cx, cy = rect["x"] + rect["width"] / 2, rect["y"] + rect["height"] / 2  # the image is centred, at `zoom`

    def stroke(points):
        to = lambda u, v: (cx + (u - w / 2) * zoom, cy + (v - h / 2) * zoom)  # noqa: E731
        page.mouse.move(*to(*points[0]))
        page.mouse.down()
        for pt in points[1:]:
            page.mouse.move(*to(*pt), steps=2)  # each move re-renders the canvas (slow in software)
        page.mouse.up()

    stroke(mask_points)  # the Mask layer is selected at start
    page.locator("#editor button.layer-title-button").click()
    page.locator("#editor button[aria-label='layer-2']").click()  # Sketch
    page.locator("#editor button.layer-title-button").click()
    stroke(sketch_points)
    for name, value in zip(("x0", "y0", "x1", "y1"), box):
        page.fill(f"#box_{name} input", str(value))
    page.click("#generate")
    img = page.locator("#gallery img").first
    img.wait_for(timeout=90000)
    status = page.inner_text("#status")
    response = page.request.get(img.get_attribute("src"))
    assert response.ok
    return Image.open(io.BytesIO(response.body())).convert("RGB"), status


def _zigzag(x0, y0, x1, y1, step=20):
    pts = [(x0, y0)]
    for y in range(y0, y1 + 1, step):
        pts += [(x1, y), (x0, min(y + step // 2, y1))]
    return pts


@pytest.mark.parametrize("viewport, region", [
    ({"width": 1280, "height": 1000}, (100, 110, 170, 180)),  # desktop: columns side by side
    ({"width": 600, "height": 1100}, (40, 40, 110, 110)),  # narrow: stacked, the canvas is scaled down
])
def test_browser_draw_and_generate(app_url, browser, tmp_path, viewport, region):
    ex = example_inputs(256)
    src = tmp_path / "source.png"
    ex.image.save(src)
    external = []
    page = browser.new_page(viewport=viewport)

    def guard(route):  # the page must not reach anything but the local app
        if route.request.url.startswith(app_url):
            route.continue_()
        else:
            external.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    x0, y0, x1, y1 = region
    t0 = time.time()
    result, status = _draw_and_generate(page, app_url, src, _zigzag(x0, y0, x1, y1),
                                        [(x0 + 15, y0 + 15), (x1 - 15, y1 - 15)], (10, 10, 100, 100))
    page.close()
    assert external == []
    assert "1 image(s), 256x256, ddim × 4 steps" in status
    assert result.size == (256, 256)
    out, srcpx = np.asarray(result).astype(int), np.asarray(ex.image).astype(int)
    changed = np.abs(out - srcpx).max(-1) > 0
    # Paste-back is on, so only the hole changes. The hole is the painted region grown by the brush radius
    # (Gradio's automatic size), the model-size rounding (4 px here) and the feathered edge: it must lie
    # within a generous margin of the region and be centred on it (alignment at this screen size).
    ys, xs = np.nonzero(changed)
    margin = 48
    inside = (xs >= x0 - margin) & (xs < x1 + margin) & (ys >= y0 - margin) & (ys < y1 + margin)
    assert inside.all(), f"changes span x {xs.min()}..{xs.max()}, y {ys.min()}..{ys.max()}; painted {region}"
    centre = np.array([xs.mean(), ys.mean()])
    np.testing.assert_allclose(centre, [(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2], atol=6)
    assert changed[y0 + 10:y1 - 10, x0 + 10:x1 - 10].mean() > 0.5
    print(f"browser round trip at {viewport['width']}px: {time.time() - t0:.1f} s")

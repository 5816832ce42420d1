"""notebooks/sampling.ipynb run headless top to bottom (nbclient, a real kernel) against the tiny demo model
(`configs/demo.py` trained for 2 steps: the `demo_workdir` fixture, a training work directory), and its drawing
canvas driven in a headless Chromium (the Colab and the anywidget front ends)."""
import json
import os

import nbformat
import numpy as np
import pytest
from PIL import Image

from sketchcomp_jax.app.examples import example_inputs

from tests.conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "sampling.ipynb"
SIZE = 160  # not a multiple of the model's 64 px: results must come back at the source size
FRACTIONS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def executed(demo_workdir, tmp_path_factory):
    from nbclient import NotebookClient

    out = tmp_path_factory.mktemp("notebook_out")
    env = {"SKETCHCOMP_MODEL": str(demo_workdir), "SKETCHCOMP_OUTPUT_DIR": str(out), "SKETCHCOMP_STEPS": "4",
           "SKETCHCOMP_EXAMPLE_SIZE": str(SIZE), "SKETCHCOMP_NUM_SAMPLES": "2",
           "SKETCHCOMP_TRAIN_DEMO_IF_MISSING": "false", "JAX_PLATFORMS": "cpu"}
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with pytest.MonkeyPatch.context() as mp:  # the kernel inherits this process's environment
        for key, value in env.items():
            mp.setenv(key, value)
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(NOTEBOOK.parent)}})
        client.execute()  # raises CellExecutionError on the first failing cell
    return nb, out


def test_notebook_is_valid_and_colab_ready():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    first = nb.cells[1]
    assert first.cell_type == "code" and "find_spec(\"sketchcomp_jax\") is None" in first.source  # install cell
    assert any("#@param" in c.source for c in nb.cells if c.cell_type == "code")  # Colab form fields
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"


def test_every_cell_ran_without_errors(executed):
    nb, _ = executed
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert errors == []
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert "loaded training run" in text and "saved" in text


def test_results_are_saved_at_the_source_size(executed):
    _, out = executed
    ex = example_inputs(SIZE)
    results = sorted(out.glob("result_*.png"))
    assert [p.name for p in results] == ["result_0.png", "result_1.png"]
    # Headless, nothing was drawn: the example's inputs were used and written next to the results.
    np.testing.assert_array_equal(np.asarray(Image.open(out / "input_mask.png").convert("L")), np.asarray(ex.mask))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "input_image.png")), np.asarray(ex.image))
    src = np.asarray(ex.image).astype(int)
    x0, y0, x1, y1 = ex.reference_box
    for path in results:
        img = Image.open(path)
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
        arr = np.asarray(img).astype(int)
        # Paste-back (the notebook's default): the source survives away from the hole, the hole changes.
        assert np.array_equal(arr[: y0 - 8], src[: y0 - 8])
        assert not np.array_equal(arr[y0:y1, x0:x1], src[y0:y1, x0:x1])
    assert not np.array_equal(np.asarray(Image.open(results[0])), np.asarray(Image.open(results[1])))


def test_drop_fraction_grid_has_one_column_per_fraction(executed):
    _, out = executed
    grid = Image.open(out / "drop_grid.png")
    assert grid.size == (5 * SIZE, SIZE)
    meta = json.loads((out / "drop_grid.json").read_text())
    assert meta["fractions"] == FRACTIONS and meta["column_width"] == SIZE
    g = np.asarray(grid)
    columns = [g[:, i * SIZE:(i + 1) * SIZE] for i in range(5)]
    for f, col in zip(FRACTIONS, columns):
        np.testing.assert_array_equal(col, np.asarray(Image.open(out / f"drop_{f:.2f}.png")))
    # Dropping the sketch after 0 steps vs never dropping it changes the picture.
    assert not np.array_equal(columns[0], columns[-1])


# ---------------------------------------------------------------------------------------------- canvas
def _drag(page, points, size):
    """Mouse drag through `points` given in source pixels, placed with the *background* canvas's box (the
    strokes go to the overlay canvas: landing on the right pixels means the layers are aligned)."""
    rect = page.locator(".skc-bg").bounding_box()
    sx, sy = rect["width"] / size[0], rect["height"] / size[1]
    to = lambda u, v: (rect["x"] + (u + 0.5) * sx, rect["y"] + (v + 0.5) * sy)  # noqa: E731
    page.mouse.move(*to(*points[0]))
    page.mouse.down()
    for pt in points[1:]:
        page.mouse.move(*to(*pt), steps=4)
    page.mouse.up()


def _draw_all(page, size):
    page.wait_for_function("document.querySelector('.skc-bg').width > 0")
    _drag(page, [(20, 30), (100, 30)], size)  # Mask is the initial mode
    page.locator("input[value=sketch]").check()
    _drag(page, [(40, 60), (40, 110)], size)
    page.locator("input[value=box]").check()
    _drag(page, [(10, 12), (70, 52)], size)


def _check_drawn(inputs, size, brush):
    assert inputs.drawn and inputs.image.size == size
    mask, sketch = np.asarray(inputs.mask) > 0, np.asarray(inputs.sketch) > 0
    r = brush / 2
    assert mask[30, 25:96].all() and sketch[65:106, 40].all()  # along the strokes
    ys, xs = np.nonzero(mask)
    assert ys.min() >= 30 - r - 1 and ys.max() <= 30 + r + 1 and xs.min() >= 20 - r - 1 and xs.max() <= 100 + r + 1
    ys, xs = np.nonzero(sketch)
    assert xs.min() >= 40 - r - 1 and xs.max() <= 40 + r + 1
    np.testing.assert_allclose(inputs.reference_box, (10, 12, 71, 53), atol=1)


def test_canvas_colab_front_end(browser):
    """The Colab page: strokes reach the kernel through google.colab.kernel.invokeFunction."""
    from sketchcomp_jax.app.canvas_js import colab_html
    from sketchcomp_jax.app.notebook import DrawingCanvas

    ex = example_inputs(SIZE)
    canvas = DrawingCanvas(ex.image)
    page = browser.new_page(viewport={"width": 1000, "height": 900})  # displayed at 2× the source size
    stub = ("<script>window.calls = []; window.google = {colab: {kernel: {invokeFunction: "
            "(name, args, kw) => { window.calls.push([name, args]); return Promise.resolve(); }}}};</script>")
    page.set_content(stub + colab_html("root", canvas.callback_name, json.dumps(canvas.state)))
    _draw_all(page, ex.image.size)
    calls = page.evaluate("window.calls")
    page.close()
    assert {name for name, _ in calls} == {canvas.callback_name}
    for _, (changes,) in calls:
        canvas.receive(changes)
    _check_drawn(canvas.inputs(fallback_mask=ex.mask), ex.image.size, canvas.state["brush"])


ANYWIDGET_HOST = """
async (esm) => {
  const state = Object.assign({}, window.initial), listeners = {};
  window.state = state;
  const model = {
    get: k => state[k],
    set: (k, v) => { state[k] = v; (listeners['change:' + k] || []).forEach(cb => cb()); },
    save_changes: () => {},
    on: (ev, cb) => { (listeners[ev] = listeners[ev] || []).push(cb); },
  };
  const url = URL.createObjectURL(new Blob([esm], {type: 'text/javascript'}));
  const mod = await import(url);
  mod.default.render({model, el: document.getElementById('root')});
}
"""


def test_canvas_anywidget_front_end_with_an_uploaded_image(browser, tmp_path):
    """The Jupyter widget: its ES module renders, a picture loaded with the canvas's file input replaces the
    source, strokes land on that picture's pixels at a small display size."""
    from sketchcomp_jax.app.canvas_js import ANYWIDGET_ESM, CSS
    from sketchcomp_jax.app.notebook import DrawingCanvas

    ex = example_inputs(SIZE)
    canvas = DrawingCanvas(ex.image)
    canvas.show()  # outside a kernel this only prints the widget; it creates the real anywidget object
    upload = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 120, 3), np.uint8))
    upload.save(tmp_path / "upload.png")
    page = browser.new_page(viewport={"width": 220, "height": 600})  # displayed smaller than the source
    page.set_content(f"<style>{CSS}</style><div id='root'></div>")
    page.evaluate(f"window.initial = {json.dumps(canvas.state)}")
    page.evaluate(ANYWIDGET_HOST, ANYWIDGET_ESM)
    page.locator(".skc-file").set_input_files(str(tmp_path / "upload.png"))
    page.wait_for_function("document.querySelector('.skc-bg').width === 120")
    _draw_all(page, (120, 90))
    state = page.evaluate("window.state")
    page.close()
    for name in DrawingCanvas.FIELDS:  # what the widget's comm would sync
        setattr(canvas._widget, name, state[name])
    inputs = canvas.inputs(fallback_mask=ex.mask)
    np.testing.assert_array_equal(np.asarray(inputs.image), np.asarray(upload))
    _check_drawn(inputs, (120, 90), state["brush"])


def test_canvas_fallback_and_errors():
    from sketchcomp_jax.app.layers import encode_data_url
    from sketchcomp_jax.app.notebook import DrawingCanvas, env_overrides

    ex = example_inputs(64)
    canvas = DrawingCanvas(ex.image)
    fallback = canvas.inputs(fallback_mask=ex.mask, fallback_sketch=ex.sketch, fallback_box=ex.reference_box)
    assert not fallback.drawn and fallback.mask is ex.mask and fallback.reference_box == ex.reference_box
    with pytest.raises(ValueError, match="nothing to fill"):
        canvas.inputs()
    canvas.receive(json.dumps({"source": encode_data_url(Image.new("RGB", (32, 32)))}))
    with pytest.raises(ValueError, match="nothing to fill"):  # a new picture needs its own mask
        canvas.inputs(fallback_mask=ex.mask)
    with pytest.raises(ValueError, match="unknown fields"):
        canvas.receive(json.dumps({"password": "x"}))
    os.environ["SKETCHCOMP_TEST_STEPS"] = "7"
    os.environ["SKETCHCOMP_TEST_PASTE"] = "no"
    try:
        got = env_overrides({"STEPS": 20, "PASTE": True, "NAME": "a"}, prefix="SKETCHCOMP_TEST_")
    finally:
        del os.environ["SKETCHCOMP_TEST_STEPS"], os.environ["SKETCHCOMP_TEST_PASTE"]
    assert got == {"STEPS": 7, "PASTE": False, "NAME": "a"}

"""The notebook drawing canvas, in the browser: plain JavaScript, no libraries, kept as Python strings so
that it ships inside the package (no data files to install).

`RENDER_JS` defines `renderSketchCanvas(model, el)`. `model` is an anywidget-style model
(`get(name)`, `set(name, value)`, `save_changes()`, `on('change:NAME', cb)`); the Colab page supplies a
small stand-in that sends changes to the kernel with `google.colab.kernel.invokeFunction`.

State names: `source` (data URL of the background picture), `mask` / `sketch` (data URLs of RGBA layers:
opaque where painted, transparent elsewhere, the source's pixel size), `box` ([x0, y0, x1, y1] reference
crop in source pixels, or []), `brush` (brush diameter in source pixels).

Alignment: every canvas has the source's pixel size and is stretched by CSS over the same box; pointer
positions are mapped through `getBoundingClientRect`, so strokes land on the same source pixels at any
display size or zoom.
"""

RENDER_JS = r"""
function renderSketchCanvas(model, el) {
  const MASK_RGB = '255,45,85', SKETCH_RGB = '30,107,255';
  const root = document.createElement('div');
  root.className = 'skc-root';
  root.innerHTML = `
    <div class="skc-toolbar">
      <label><input type="radio" name="skc-mode" value="mask" checked> Mask</label>
      <label><input type="radio" name="skc-mode" value="sketch"> Sketch</label>
      <label><input type="radio" name="skc-mode" value="box"> Reference box</label>
      <label><input type="checkbox" class="skc-erase"> Erase</label>
      <label>Brush <input type="range" class="skc-brush" min="1" max="64"></label>
      <button type="button" class="skc-clear">Clear layer</button>
      <label class="skc-load">Load image <input type="file" accept="image/*" class="skc-file"></label>
    </div>
    <div class="skc-stage">
      <canvas class="skc-bg"></canvas><canvas class="skc-mask"></canvas>
      <canvas class="skc-sketch"></canvas><canvas class="skc-overlay"></canvas>
    </div>
    <div class="skc-help">Mask: paint the region to fill · Sketch: draw the new lines · Reference box: drag a
      rectangle over the part of the image to use as the reference. Colours do not matter.</div>`;
  el.appendChild(root);
  // Radio groups are page-wide: give this canvas its own group (a notebook may show several).
  const group = 'skc-mode-' + Math.random().toString(36).slice(2);
  root.querySelectorAll('input[name="skc-mode"]').forEach(r => r.name = group);
  const stage = root.querySelector('.skc-stage');
  const bg = root.querySelector('.skc-bg'), overlay = root.querySelector('.skc-overlay');
  const layers = {mask: root.querySelector('.skc-mask'), sketch: root.querySelector('.skc-sketch')};
  const brushInput = root.querySelector('.skc-brush');
  brushInput.value = model.get('brush') || 12;
  let box = (model.get('box') || []).slice();

  function mode() { return root.querySelector('input[name="' + group + '"]:checked').value; }

  function sizeTo(w, h) {
    for (const c of [bg, overlay, layers.mask, layers.sketch]) { c.width = w; c.height = h; }
    stage.style.aspectRatio = w + ' / ' + h;
    stage.style.maxWidth = Math.min(w * 2, 640) + 'px';
  }

  function loadSource(url, keepLayers) {
    if (!url) return;
    const img = new Image();
    img.onload = () => {
      const saved = keepLayers ? {mask: model.get('mask'), sketch: model.get('sketch')} : null;
      sizeTo(img.naturalWidth, img.naturalHeight);
      bg.getContext('2d').drawImage(img, 0, 0);
      if (saved) for (const name of ['mask', 'sketch']) restoreLayer(name, saved[name]);
      drawBox();
    };
    img.src = url;
  }

  function restoreLayer(name, url) {
    if (!url) return;
    const img = new Image();
    img.onload = () => layers[name].getContext('2d').drawImage(img, 0, 0, layers[name].width, layers[name].height);
    img.src = url;
  }

  function drawBox() {
    const ctx = overlay.getContext('2d');
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    if (box.length !== 4) return;
    const lw = Math.max(1, Math.round(overlay.width / 200));
    ctx.lineWidth = lw;
    ctx.setLineDash([4 * lw, 3 * lw]);
    ctx.strokeStyle = 'rgb(255,200,0)';
    ctx.strokeRect(box[0] + lw / 2, box[1] + lw / 2, box[2] - box[0] - lw, box[3] - box[1] - lw);
  }

  function toImage(ev) {
    // CSS pixels → source pixels, whatever the displayed size.
    const r = overlay.getBoundingClientRect();
    return [(ev.clientX - r.left) * overlay.width / r.width, (ev.clientY - r.top) * overlay.height / r.height];
  }

  function send(name, value) { model.set(name, value); model.save_changes(); }

  let drawing = null;
  overlay.addEventListener('pointerdown', ev => {
    if (!overlay.width) return;
    ev.preventDefault();
    overlay.setPointerCapture(ev.pointerId);
    const p = toImage(ev), m = mode();
    if (m === 'box') { drawing = {mode: m, start: p}; return; }
    const ctx = layers[m].getContext('2d');
    ctx.globalCompositeOperation = root.querySelector('.skc-erase').checked ? 'destination-out' : 'source-over';
    ctx.strokeStyle = ctx.fillStyle = 'rgb(' + (m === 'mask' ? MASK_RGB : SKETCH_RGB) + ')';
    ctx.lineWidth = Number(brushInput.value);
    ctx.lineCap = 'round'; ctx.lineJoin = 'round';
    ctx.beginPath(); ctx.arc(p[0], p[1], ctx.lineWidth / 2, 0, 2 * Math.PI); ctx.fill();
    ctx.beginPath(); ctx.moveTo(p[0], p[1]);
    drawing = {mode: m, ctx: ctx};
  });
  overlay.addEventListener('pointermove', ev => {
    if (!drawing) return;
    const p = toImage(ev);
    if (drawing.mode === 'box') {
      const [x0, y0] = drawing.start;
      const clamp = (v, hi) => Math.max(0, Math.min(hi, Math.round(v)));
      box = [clamp(Math.min(x0, p[0]), overlay.width), clamp(Math.min(y0, p[1]), overlay.height),
             clamp(Math.max(x0, p[0]), overlay.width), clamp(Math.max(y0, p[1]), overlay.height)];
      drawBox();
      return;
    }
    drawing.ctx.lineTo(p[0], p[1]); drawing.ctx.stroke();
    drawing.ctx.beginPath(); drawing.ctx.moveTo(p[0], p[1]);
  });
  const finish = () => {
    if (!drawing) return;
    const m = drawing.mode;
    drawing = null;
    if (m === 'box') {
      if (box.length === 4 && (box[2] - box[0] < 2 || box[3] - box[1] < 2)) box = [];
      drawBox();
      send('box', box.slice());
    } else {
      send(m, layers[m].toDataURL('image/png'));
    }
  };
  overlay.addEventListener('pointerup', finish);
  overlay.addEventListener('pointercancel', finish);
  brushInput.addEventListener('change', () => send('brush', Number(brushInput.value)));

  root.querySelector('.skc-clear').addEventListener('click', () => {
    const m = mode();
    if (m === 'box') { box = []; drawBox(); send('box', []); return; }
    layers[m].getContext('2d').clearRect(0, 0, layers[m].width, layers[m].height);
    send(m, '');
  });

  root.querySelector('.skc-file').addEventListener('change', ev => {
    const file = ev.target.files[0];
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      const img = new Image();
      img.onload = () => {
        // Re-encode as PNG so the kernel always receives one format.
        const c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        c.getContext('2d').drawImage(img, 0, 0);
        box = [];
        model.set('mask', ''); model.set('sketch', ''); model.set('box', []);
        send('source', c.toDataURL('image/png'));
        loadSource(model.get('source'), false);
      };
      img.src = reader.result;
    };
    reader.readAsDataURL(file);
  });

  if (model.on) model.on('change:source', () => { box = (model.get('box') || []).slice(); loadSource(model.get('source'), true); });
  loadSource(model.get('source'), true);
}
"""

CSS = r"""
.skc-root { font: 13px sans-serif; }
.skc-toolbar { display: flex; flex-wrap: wrap; gap: 10px; align-items: center; margin-bottom: 6px; }
.skc-load input { max-width: 190px; }
.skc-stage { position: relative; width: 100%; touch-action: none; user-select: none; background: #eee; }
.skc-stage canvas { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.skc-mask { opacity: 0.55; }
.skc-overlay { cursor: crosshair; }
.skc-help { color: #666; margin-top: 4px; }
"""

ANYWIDGET_ESM = RENDER_JS + """
export default { render({ model, el }) { renderSketchCanvas(model, el); } };
"""


def colab_html(element_id: str, callback_name: str, state_json: str) -> str:
    """A self-contained HTML snippet for Colab: the canvas plus a model stand-in that forwards every
    `save_changes()` to the kernel callback `callback_name` as one JSON string of the changed fields."""
    return f"""
<style>{CSS}</style>
<div id="{element_id}"></div>
<script>
(function() {{
{RENDER_JS}
  const state = {state_json};
  let pending = {{}};
  const model = {{
    get: k => state[k],
    set: (k, v) => {{ state[k] = v; pending[k] = v; }},
    save_changes: () => {{
      const changes = JSON.stringify(pending); pending = {{}};
      google.colab.kernel.invokeFunction('{callback_name}', [changes], {{}});
    }},
    on: () => {{}},
  }};
  renderSketchCanvas(model, document.getElementById('{element_id}'));
}})();
</script>
"""

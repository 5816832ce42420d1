"""User-facing front ends over `SketchCompositionPipeline`: the Gradio web UI (`ui`), the notebook's drawing
canvas (`notebook`), and what they share: painted layers → mask/sketch (`layers`), built-in example
inputs (`examples`), the sketch-drop sweep and grids (`results`). Gradio and anywidget are imported only
by `ui` and `notebook`, and only when used."""

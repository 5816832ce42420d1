"""The Table 1 baselines through the same commands: Paint-by-E (9 channels, no sketch) and Paint-by-T+S
(tags through a frozen CLIP text encoder), trained on the demo config and evaluated."""
import json

import numpy as np
import pytest

from sketchcomp_jax.data.synthetic import TAG_WORDS, render_scene, write_synthetic_dataset
from sketchcomp_jax.eval.evaluate import EvalSettings, evaluate
from sketchcomp_jax.model_source import load_model_source
from sketchcomp_jax.models.clip_tokenizer import CLIPTokenizer
from sketchcomp_jax.train.loop import train

from tests.conftest import tiny_demo_config


def _cfg(variant, data_dir):
    """Two steps of the demo variant, with a sample grid at the end; the data set is made by the fixture."""
    return tiny_demo_config(data_dir, variant, total_steps=2, checkpoint_every=2, sample_every=2, sample_steps=2,
                            **{"data.synthetic_images": 0})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("baselines") / "synth"), 24, seed=1, size=64)


def test_synthetic_tags_are_whole_tokens_of_the_synthetic_tokenizer(data_dir):
    tok = CLIPTokenizer.from_folder(f"{data_dir}/tokenizer")
    words = {w for i in range(40) for w in render_scene(0, i, 64)[2].split()}
    assert words <= set(TAG_WORDS)
    for w in TAG_WORDS:
        ids = tok.tokenize_ids(w)
        pieces = [tok.clean(w)] if w[0].isalpha() else [w[0], w[1:]]  # CLIP splits off single digits
        assert len(ids) == len(pieces), (w, ids)


@pytest.fixture(scope="module")
def text_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_ts")
    summary = train(_cfg("paint_by_t_s", data_dir), str(workdir))
    return workdir, summary


def test_text_baseline_trains_with_a_frozen_text_encoder(text_run):
    workdir, summary = text_run
    assert summary["step"] == 2 and np.isfinite(summary["last"]["loss"])
    config = json.loads((workdir / "model_config.json").read_text())
    assert config["conditioning"] == "text" and config["text"]["hidden_size"] == 32
    assert (workdir / "tokenizer" / "vocab.json").is_file()
    assert (workdir / "samples" / "step_0000002.png").is_file()
    source = load_model_source(workdir)
    cond = source.params["conditioner"]
    assert set(cond) == {"text", "uncond_vector"}
    # The unconditional context is the encoding of "" by the (frozen) text tower.
    from sketchcomp_jax.models.text_conditioner import empty_prompt_context

    tok = CLIPTokenizer.from_folder(workdir / "tokenizer")
    np.testing.assert_allclose(np.asarray(cond["uncond_vector"]),
                               empty_prompt_context(source.config.text, cond["text"], tok("")), atol=1e-6)


def test_text_baseline_samples_and_evaluates(text_run, data_dir, tmp_path):
    workdir, _ = text_run
    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    pipe = SketchCompositionPipeline.from_pretrained(workdir)
    image, sketch, tags = render_scene(3, 0, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    kw = dict(steps=2, sampler="ddim", seed=0, vae_encode="mean")
    a = pipe(image, mask, sketch, prompt=tags.replace(" ", ","), **kw).images01
    b = pipe(image, mask, sketch, prompt="", **kw).images01
    assert a.shape == (1, 64, 64, 3) and not np.allclose(a, b)  # the prompt conditions the result
    results = evaluate(data_dir, tmp_path / "ts.json", model_dir=workdir,
                       settings=EvalSettings(num=2, batch_size=2, steps=2, sampler="ddim"), progress=False)
    assert results["num_images"] == 2 and np.isfinite(results["metrics"]["l1_hole"])
    assert "clip_i" not in results["metrics"]  # no CLIP image tower in a text model and no --clip_weights


def test_text_run_becomes_a_model_directory_with_its_tokenizer(text_run, tmp_path):
    """`workdir_to_model_dir` (what the notebook/UI error tells text-baseline users to run) keeps the tokenizer."""
    from sketchcomp_jax.model_source import workdir_to_model_dir
    from sketchcomp_jax.pipeline import SketchCompositionPipeline

    workdir, _ = text_run
    out = workdir_to_model_dir(workdir, tmp_path / "ts_model")
    assert (out / "tokenizer" / "vocab.json").read_bytes() == (workdir / "tokenizer" / "vocab.json").read_bytes()
    pipe = SketchCompositionPipeline.from_pretrained(out)
    assert pipe.config.conditioning == "text" and pipe.tokenizer("cat").shape == (1, 77)


@pytest.mark.slow  # a third training compile (~90 s); the 9-channel U-Net is also built by test_convert's surgery tests
def test_paint_by_e_baseline_has_no_sketch_channels(data_dir, tmp_path):
    summary = train(_cfg("paint_by_e", data_dir), str(tmp_path))
    assert summary["step"] == 2
    source = load_model_source(tmp_path)
    assert source.config.unet.in_channels == 9 and not source.config.uses_sketch
    kernel = source.params["unet"]["input_blocks_0"]["kernel"]
    assert kernel.shape[2] == 9

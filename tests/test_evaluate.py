"""launch/evaluate.py end to end on the fixture model and a small synthetic test split."""
import json
import shutil
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sketchcomp_jax.data.synthetic import write_synthetic_dataset
from sketchcomp_jax.eval.evaluate import EvalSettings, evaluate

from tests.conftest import REPO_ROOT

SETTINGS = EvalSettings(num=4, batch_size=2, steps=4, sampler="ddim", guidance_scale=3.0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 64² scenes: the fixture model's resolution; test_fraction 0.5 gives a test split of ~10.
    return write_synthetic_dataset(str(tmp_path_factory.mktemp("evaldata") / "synth"), 20, seed=5, size=64,
                                   test_fraction=0.5)


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "results.json"
    results = evaluate(data_dir, out, model_dir=tiny_model_dir, settings=SETTINGS, export_inputs=True, progress=False)
    return out, results


def test_results_have_every_metric(first_run):
    out, results = first_run
    saved = json.loads(out.read_text())
    assert saved["num_images"] == 4 and results["generated_now"] == 4
    m = saved["metrics"]
    for key in ("l1", "l2", "l1_hole", "l2_hole", "clip_i", "clip_fd", "sketch_precision", "sketch_recall",
                "sketch_f1", "sketch_chamfer", "gt_sketch_f1"):
        assert key in m, key
    assert 0 < m["l1"] < 1 and 0 < m["l2"] < 1
    # The random tiny model reconstructs the kept region through the VAE only, so the hole error dominates.
    assert m["l1_hole"] > m["l1"] * 0.5
    assert saved["encoders"]["sketch"] == "xdog"
    assert "model's CLIP" in saved["encoders"]["clip"]
    assert len(saved["per_image"]) == 4 and len({r["id"] for r in saved["per_image"]}) == 4
    table = out.with_suffix(".md").read_text()
    assert "| L1 (whole image) |" in table and "| sketch F1 |" in table


def test_rerun_resumes_from_the_cached_samples(first_run, tiny_model_dir, data_dir):
    out, results = first_run
    again = evaluate(data_dir, out.with_name("again.json"), model_dir=tiny_model_dir,
                     samples_dir=results["samples"], settings=SETTINGS, progress=False)
    assert again["generated_now"] == 0
    assert again["metrics"] == pytest.approx(results["metrics"], nan_ok=True)


def test_generation_is_independent_of_the_batch_size(first_run, tiny_model_dir, data_dir, tmp_path):
    _, results = first_run
    other = evaluate(data_dir, tmp_path / "b1.json", model_dir=tiny_model_dir,
                     settings=EvalSettings(**{**SETTINGS.__dict__, "batch_size": 1}), progress=False)
    for a, b in zip(results["per_image"], other["per_image"]):
        assert a["id"] == b["id"]
        assert a["l1"] == pytest.approx(b["l1"], abs=2e-3)  # same noise per record; uint8 rounding aside


def test_scoring_ground_truth_as_results_gives_zero_error(first_run, data_dir, tmp_path):
    """The exported inputs' images are the ground truth: scored as results (no model), L1/L2 are 0 and
    the sketch score equals the ground-truth ceiling."""
    _, results = first_run
    samples = tmp_path / "gt_as_results"
    samples.mkdir()
    for folder in sorted((Path(results["samples"]) / "inputs").iterdir()):
        shutil.copy(folder / "image.png", samples / f"{folder.name}.png")
    scored = evaluate(data_dir, tmp_path / "gt.json", samples_dir=samples, settings=SETTINGS, progress=False)
    m = scored["metrics"]
    assert scored["generated_now"] == 0
    # Zero up to the uint8 quantisation of the PNGs (the ground truth is the float bilinear resize).
    assert m["l1"] < 1 / 255 and m["l1_hole"] < 1 / 255 and m["l2"] < (1 / 255) ** 2
    assert m["sketch_f1"] == pytest.approx(m["gt_sketch_f1"])
    mask = np.asarray(Image.open(next((Path(results["samples"]) / "inputs").iterdir()) / "mask.png"))
    assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()  # white = fill


def test_missing_results_without_a_model_is_a_clear_error(data_dir, tmp_path):
    samples = tmp_path / "partial"
    samples.mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(samples / "unrelated.png")
    with pytest.raises(FileNotFoundError, match="no --model"):
        evaluate(data_dir, tmp_path / "r.json", samples_dir=samples, settings=SETTINGS, progress=False)


def test_cli(tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "launch/evaluate.py", f"--model={tiny_model_dir}", f"--data={data_dir}", "--num=2",
           "--batch_size=2", "--steps=2", "--sampler=ddim", f"--out={out}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| L1 (hole) |" in proc.stdout and json.loads(out.read_text())["num_images"] == 2
    bad = subprocess.run([sys.executable, "launch/evaluate.py", f"--data={data_dir}", f"--out={out}"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--model" in bad.stderr

"""launch/evaluate.py end to end on the fixture model and a small synthetic test split."""
import dataclasses
import json
import shutil
from pathlib import Path
import subprocess
import sys

import jax
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
    out, _ = first_run
    evaluate(data_dir, tmp_path / "b1.json", model_dir=tiny_model_dir,
             settings=EvalSettings(**{**SETTINGS.__dict__, "batch_size": 1}), progress=False)
    rows, other_rows = (json.loads(p.read_text())["per_image"] for p in (out, tmp_path / "b1.json"))
    assert len(rows) == len(other_rows) == 4
    for a, b in zip(rows, other_rows):
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


def test_model_weights_choice_reaches_the_loader(tiny_model_dir, data_dir, tmp_path):
    """`--weights` / `model_weights` goes to `from_pretrained`: the tiny model dir holds the raw set, so asking
    for EMA is refused before anything is generated or written."""
    settings = dataclasses.replace(SETTINGS, model_weights="ema")
    with pytest.raises(ValueError, match="holding the raw U-Net weights, not the ema ones"):
        evaluate(data_dir, tmp_path / "r.json", model_dir=tiny_model_dir, settings=settings, progress=False)
    assert not (tmp_path / "r.json").exists() and not any((tmp_path / "r_samples").glob("*.png"))


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


# ------------------------------------------------------------------ streaming = the in-memory computation


def test_running_statistics_equal_feature_statistics():
    """Mean/covariance accumulated batch by batch, and merged across two "hosts", equal np.mean/np.cov of all
    the features at once to float64 rounding (rtol 1e-12; features with a large common offset, where a
    raw sum-of-squares formula would lose ~8 digits)."""
    from sketchcomp_jax.eval.fid import RunningStatistics, feature_statistics

    rng = np.random.default_rng(0)
    feats = 1e3 + rng.normal(size=(37, 6)) @ rng.normal(size=(6, 6))
    a, b = RunningStatistics(6), RunningStatistics(6)
    for chunk in np.split(feats[:20], [3, 4, 11]):  # uneven batches, one of a single vector
        a.update(chunk)
    b.update(feats[20:])
    a.merge(b)
    mu, sigma = feature_statistics(feats)
    np.testing.assert_allclose(a.statistics()[0], mu, rtol=1e-12)
    np.testing.assert_allclose(a.statistics()[1], sigma, rtol=1e-9, atol=1e-12 * np.abs(sigma).max())


def test_metric_sums_equal_aggregate():
    from sketchcomp_jax.eval.metrics import MetricSums, aggregate

    rows = [{"l1": 0.1, "chamfer": float("nan")}, {"l1": 0.3, "chamfer": 2.0}, {"l1": 0.2, "chamfer": 4.0},
            {"l1": 0.25, "only_nan": float("nan")}]
    sums, other = MetricSums(), MetricSums()
    for r in rows[:2]:
        sums.add(r)
    for r in rows[2:]:
        other.add(r)
    sums.merge(other)
    got, want = sums.means(), aggregate(rows)
    assert list(got) == list(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-15, nan_ok=True)


def _reference_scores(data_dir, samples, settings, resolution, reference_size, clip):
    """The evaluation as it was before streaming (kept here as the reference): the old loader, every image
    in memory, CLIP embeddings of all images at once, `aggregate` of all rows, `fid_from_features`."""
    from sketchcomp_jax.data.pipeline import make_train_loader
    from sketchcomp_jax.eval import metrics as M
    from sketchcomp_jax.eval.evaluate import _reference01, _safe_name, _sketch_scores, _SketchExtractor, _unit
    from sketchcomp_jax.eval.fid import fid_from_features
    from sketchcomp_jax.imageio import hole_bbox

    loader = make_train_loader(str(data_dir), split=settings.split, resolution=resolution, reference_size=reference_size,
                               global_batch_size=settings.batch_size, seed=settings.data_seed, shard_index=0,
                               shard_count=1, eval_mode=True, num_epochs=1, drop_remainder=False, with_ids=True)
    extractor = _SketchExtractor("xdog", None)
    per_image, results01, gts01, holes, refs = [], [], [], [], []
    for batch in loader:
        take = min(len(batch["id"]), settings.num - len(per_image))
        if take <= 0:
            break
        batch = {k: v[:take] for k, v in batch.items()}
        rows = []
        for j, rid in enumerate(batch["id"]):
            result = np.asarray(Image.open(Path(samples) / f"{_safe_name(str(rid))}.png").convert("RGB"))
            r01, g01, keep = result.astype(np.float32) / 255.0, _unit(batch["gt"][j]), np.asarray(batch["keep_mask"][j])
            rows.append({"id": str(rid), **M.reconstruction_errors(r01, g01, keep)})
            results01.append(r01)
            gts01.append(g01)
            box = hole_bbox(keep, pad=0)
            holes.append(result[box[1]:box[3], box[0]:box[2]] if box else result)
            refs.append(_reference01(np.asarray(batch["reference"][j])))
        _sketch_scores(extractor, rows, results01[-take:], gts01[-take:], batch, settings.edge_tolerance)
        per_image += rows
    summary = M.aggregate({k: v for k, v in r.items() if k != "id"} for r in per_image)
    clip_i = 100.0 * M.cosine_similarity(clip.embed(holes), clip.embed(refs))
    for row, value in zip(per_image, clip_i):
        row["clip_i"] = float(value)
    summary["clip_i"] = float(np.mean(clip_i))
    summary["clip_fd"] = float(fid_from_features(clip.embed(results01), clip.embed(gts01)))
    return summary, per_image


def test_streaming_results_equal_the_in_memory_reference(first_run, tiny_model, data_dir):
    """Same inputs (the first run's PNGs), old vs streaming computation: per-image rows and means agree to
    1e-12 relative (float64 summation order); CLIP-FD to 1e-6 relative (the covariance by running sums
    instead of np.cov, then a matrix square root of a rank-deficient product, which amplifies rounding)."""
    from sketchcomp_jax.eval.clip_score import model_clip_encoder

    out, results = first_run
    saved = json.loads(out.read_text())
    clip = model_clip_encoder(tiny_model[0], tiny_model[1])
    summary, rows = _reference_scores(data_dir, saved["samples"], SETTINGS, 64, tiny_model[0].clip.image_size, clip)
    assert [r["id"] for r in saved["per_image"]] == [r["id"] for r in rows]
    for got, want in zip(saved["per_image"], rows):
        assert set(got) == set(want)
        for k, v in want.items():
            if k != "id":
                assert (got[k] is None and np.isnan(v)) or got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    m = saved["metrics"]
    for k, v in summary.items():
        tol = 1e-6 if k == "clip_fd" else 1e-12
        assert m[k] == pytest.approx(v, rel=tol, abs=1e-12, nan_ok=True) or (m[k] is None and np.isnan(v)), k


# ------------------------------------------------------------------ memory and hosts (slow: run with -m slow)

_PEAK_RSS = """
import resource, subprocess, sys
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(proc.stderr[-3000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 if proc.returncode == 0 else -1)
"""


def peak_rss_of(cmd, env=None) -> int:
    """Peak resident set size (bytes) of the command, measured by a fresh parent (getrusage of its only child)."""
    proc = subprocess.run([sys.executable, "-c", _PEAK_RSS, sys.executable, *cmd], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    rss = int(proc.stdout.strip().splitlines()[-1])
    assert rss > 0, proc.stderr[-3000:]
    return rss


@pytest.fixture(scope="module")
def big_test_split(tmp_path_factory):
    """A synthetic data set with at least 64 test records at the tiny model's 64 px."""
    from sketchcomp_jax.data.pipeline import RecordSource

    path = write_synthetic_dataset(str(tmp_path_factory.mktemp("evalbig") / "synth"), 160, seed=7, size=64,
                                   test_fraction=0.5)
    assert len(RecordSource(path, "test")) >= 64
    return path


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_test_images(tiny_model, tiny_model_dir, big_test_split,
                                                                    tmp_path):
    """Acceptance: `launch/evaluate.py` peak RSS at 8 and at 64 test images (generation, PNGs, L1/L2, sketch
    scores, CLIP-I and CLIP-FD) differs by less than the model's parameter bytes."""
    import os

    model_bytes = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tiny_model[1]))
    # Every measured run loads its programs from a persistent compilation cache warmed by a first run: XLA's
    # compile is a transient of a few hundred MiB that does not depend on the number of images but moves by
    # +-25 MiB from run to run with thread timing (measured), three times the tiny model's size.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.pop("JAX_ENABLE_COMPILATION_CACHE", None)

    def command(num):
        # The CLI's default --batch_size (4): 8 images are two batches, so both runs reach the steady state
        # (scorers warmed up while a batch generates) and the comparison shows growth, not warm-up.
        return ["launch/evaluate.py", f"--model={tiny_model_dir}", f"--data={big_test_split}", f"--num={num}",
                "--steps=2", "--sampler=ddim", f"--out={tmp_path / f'n{num}.json'}"]

    peak_rss_of(command(4), env)  # fills the compilation cache
    rss = {}
    for num in (8, 64):
        peaks = []
        for _ in range(2):  # each generating anew
            shutil.rmtree(tmp_path / f"n{num}_samples", ignore_errors=True)
            peaks.append(peak_rss_of(command(num), env))
            assert json.loads((tmp_path / f"n{num}.json").read_text())["num_images"] == num
        rss[num] = min(peaks)
    print(f"peak RSS: 8 images {rss[8] / 2**20:.1f} MiB, 64 images {rss[64] / 2**20:.1f} MiB, "
          f"difference {(rss[64] - rss[8]) / 2**20:+.2f} MiB; model {model_bytes / 2**20:.2f} MiB")
    assert abs(rss[64] - rss[8]) < model_bytes


@pytest.mark.slow
def test_two_hosts_give_the_single_host_results(tiny_model_dir, data_dir, tmp_path):
    """2 JAX processes on localhost (2 CPU devices each, gloo): each generates and scores every other batch,
    process 0 merges the partial sums. The results equal one process's on the same 2-device layout (same
    per-device batch, so identical images): rows and means to 1e-12 relative, CLIP-FD to 1e-6."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               SKETCHCOMP_CPU_COLLECTIVES="gloo")
    common = ["launch/evaluate.py", f"--model={tiny_model_dir}", f"--data={data_dir}", "--num=6", "--batch_size=2",
              "--steps=2", "--sampler=ddim"]
    procs = [subprocess.Popen([sys.executable, *common, f"--out={tmp_path / 'two.json'}",
                               f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "| L1 (hole) |" in outs[0] and "| L1 (hole) |" not in outs[1]  # only process 0 reports
    one = subprocess.run([sys.executable, *common, f"--out={tmp_path / 'one.json'}"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["num_images"] == single["num_images"] == 6 and two["generated_now"] == 6
    assert [r["id"] for r in two["per_image"]] == [r["id"] for r in single["per_image"]]
    for a, b in zip(two["per_image"], single["per_image"]):
        assert set(a) == set(b)
        for k in set(a) - {"id"}:
            assert a[k] == b[k] or a[k] == pytest.approx(b[k], rel=1e-12), k  # None (NaN) equals None
    for k, v in single["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, rel=1e-6 if k == "clip_fd" else 1e-12, nan_ok=True), k
    assert not (tmp_path / "two.partial").exists()  # the partial sums are removed once merged

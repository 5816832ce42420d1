"""Bad inputs at the user boundary (issue 17): each launch tool, run as a user runs it (a subprocess), with
one bad flag or input at a time.

For every case of the table: a non-zero exit status, stderr is exactly one line `<tool>: error: ...` that
names the problem (the case's pattern; no traceback), and no file the user had (the workspace and the model
directory) was changed, created or removed. The checks run before JAX is imported wherever they can, so most
cases take a fraction of a second; the subprocesses run in a few threads (they wait on imports, not on each
other). Also: `scripts/setup_venv.sh` refuses a `.venv` of another checkout, and the good paths around the new
checks (`sample.py --overwrite`, the API's warning for a stretched mask) still work.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

CLI_ENV = dict(os.environ, JAX_PLATFORMS="cpu")
CLI_ENV.pop("XLA_FLAGS", None)  # one CPU device: nothing here runs a computation
UNWRITABLE = "/proc/sys"  # not writable even for root (the test machines run as root: chmod would not stop it)


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    tool: str  # launch/<tool>.py
    args: tuple[str, ...]  # {ws}, {model}, {e2e} are filled in
    expect: str  # regex the error line must match


def sample(*extra: str, drop: tuple[str, ...] = ()) -> tuple[str, ...]:
    """sample.py's valid arguments on the end-to-end inputs, with `extra` flags appended (absl: the last one
    given wins) and the flags in `drop` left out."""
    base = {"model": "{model}", "image": "{e2e}/image.png", "mask": "{e2e}/mask.png", "sketch": "{e2e}/sketch.png",
            "reference": "{e2e}/reference.png", "out": "{ws}/new.png", "steps": "2"}
    return tuple(f"--{k}={v}" for k, v in base.items() if k not in drop) + extra


def train(*extra: str, config: str = "configs/demo.py") -> tuple[str, ...]:
    return (f"--config={REPO_ROOT / config}", "--workdir={ws}/run") + extra


def evaluate(*extra: str) -> tuple[str, ...]:
    return ("--model={model}", "--data={ws}/data", "--out={ws}/results.json") + extra


CASES = [
    # ---- launch/sample.py
    Case("sample-out-exists", "sample", sample("--out={ws}/existing.png"), r"existing\.png exists; .*--overwrite"),
    Case("sample-out-is-dir", "sample", sample("--out={ws}/adir"), r"adir is a directory; give a file path"),
    Case("sample-out-no-folder", "sample", sample("--out={ws}/missing/out.png"), r"folder .*missing does not exist"),
    Case("sample-out-unwritable", "sample", sample(f"--out={UNWRITABLE}/out.png"), r"cannot write in /proc/sys"),
    Case("sample-out-bad-extension", "sample", sample("--out={ws}/out.xyz"), r"unknown file extension '\.xyz'"),
    Case("sample-out-empty", "sample", sample("--out="), r"--out is empty"),
    Case("sample-grid-exists", "sample", sample("--num_samples=2", "--grid", "--out={ws}/pic.png"),
         r"pic_grid\.png exists"),
    Case("sample-guidance-nan", "sample", sample("--guidance_scale=nan"), r"--guidance_scale=nan is not a finite"),
    Case("sample-guidance-inf", "sample", sample("--guidance_scale=inf"), r"--guidance_scale=inf is not a finite"),
    Case("sample-drop-after-range", "sample", sample("--sketch_drop_after=1.5"), r"--sketch_drop_after=1\.5 is out of range"),
    Case("sample-steps-zero", "sample", sample("--steps=0"), r"--steps=0 is out of range: .*\[1, 1000\]"),
    Case("sample-steps-not-int", "sample", sample("--steps=abc"), r"flag --steps=abc: invalid literal"),
    Case("sample-num-samples-zero", "sample", sample("--num_samples=0"), r"--num_samples=0 is out of range"),
    Case("sample-eta-negative", "sample", sample("--eta=-1"), r"--eta=-1(\.0)? is out of range"),
    Case("sample-noise-nan", "sample", sample("--noise={ws}/nan_noise.npy"), r"holds 1 NaN/Inf value"),
    Case("sample-noise-inf", "sample", sample("--noise={ws}/inf_noise.npy"), r"holds 2 NaN/Inf value"),
    Case("sample-noise-text", "sample", sample("--noise={ws}/notes.txt"), r"notes\.txt is a text file"),
    Case("sample-noise-dir", "sample", sample("--noise={ws}/adir"), r"--noise .*adir is a directory"),
    Case("sample-noise-objects", "sample", sample("--noise={ws}/objects.npy"), r"holds Python objects"),
    Case("sample-noise-npz", "sample", sample("--noise={ws}/arrays.npz"), r"a zip archive"),
    Case("sample-noise-shape", "sample", sample("--noise={ws}/nhwc_noise.npy"), r"shape \(1, 16, 16, 4\); .*NCHW \(N, 4, 16, 16\)"),
    Case("sample-noise-missing", "sample", sample("--noise={ws}/nope.npy"), r"nope\.npy not found"),
    Case("sample-image-bomb", "sample", sample("--image={ws}/huge.png"), r"14000x14000 = 196\.0 megapixels, above the limit of 89\.5 MP"),
    Case("sample-image-1x1", "sample", sample("--image={ws}/one_pixel.png"), r"is 1x1; each side must be at least 8 pixels"),
    Case("sample-image-is-dir", "sample", sample("--image={ws}/adir"), r"--image .*adir is a directory, not an image file"),
    Case("sample-image-text", "sample", sample("--image={ws}/notes.txt"), r"notes\.txt is not a readable image"),
    Case("sample-image-missing", "sample", sample("--image={ws}/nope.png"), r"--image not found: .*nope\.png"),
    Case("sample-mask-size", "sample", sample("--mask={ws}/mask32.png"), r"--mask .*mask32\.png is 32x32 but --image is 64x64"),
    Case("sample-sketch-size", "sample", sample("--sketch={ws}/sketch_wide.png"), r"--sketch .* is 80x64 but --image is 64x64"),
    Case("sample-box-inverted", "sample", sample("--reference_box=40,40,10,10", drop=("reference",)), r"inverted or empty"),
    Case("sample-box-outside", "sample", sample("--reference_box=0,0,100,10", drop=("reference",)), r"is not inside the 64x64 source image"),
    Case("sample-box-three-numbers", "sample", sample("--reference_box=1,2,3", drop=("reference",)), r"four integers"),
    Case("sample-no-reference", "sample", sample(drop=("reference",)), r"give --reference or --reference_box"),
    Case("sample-model-missing", "sample", sample("--model={ws}/nomodel"), r"--model .*nomodel is not a directory \(not found\)"),
    Case("sample-model-not-a-model", "sample", sample("--model={ws}/adir"), r"neither a model directory"),
    Case("sample-mask-required", "sample", sample(drop=("mask",)), r"--mask must have a value"),
    Case("sample-unknown-flag", "sample", sample("--bogus=1"), r"Unknown command line flag 'bogus'"),
    # ---- launch/convert.py
    Case("convert-src-missing", "convert", ("--src={ws}/nope.ckpt", "--out={ws}/converted"), r"--src .*nope\.ckpt not found"),
    Case("convert-src-text", "convert", ("--src={ws}/notes.txt", "--out={ws}/converted"), r"not a PyTorch checkpoint"),
    Case("convert-out-not-empty", "convert", ("--src={fixtures}/pbs_tiny.ckpt", "--out={ws}/full_dir"),
         r"full_dir exists and is not empty; .*--overwrite"),
    Case("convert-out-is-file", "convert", ("--src={fixtures}/pbs_tiny.ckpt", "--out={ws}/notes.txt"), r"notes\.txt is a file"),
    Case("convert-resolution", "convert", ("--src={fixtures}/pbs_tiny.ckpt", "--out={ws}/c", "--resolution=60"),
         r"--resolution=60 is not a multiple of 8"),
    Case("convert-in-channels", "convert", ("--src={fixtures}/pbs_tiny.ckpt", "--out={ws}/c", "--in_channels=0"),
         r"--in_channels=0 is out of range"),
    Case("convert-weights-enum", "convert", ("--src={fixtures}/pbs_tiny.ckpt", "--out={ws}/c", "--weights=best"),
         r"--weights=best: value should be one of"),
    Case("convert-yaml-missing", "convert", ("--src={fixtures}/pbs_tiny.ckpt", "--out={ws}/c", "--ldm_config={ws}/no.yaml"),
         r"--ldm_config .*no\.yaml not found"),
    Case("convert-out-unwritable", "convert", ("--src={fixtures}/pbs_tiny.ckpt", f"--out={UNWRITABLE}/m"), r"cannot write in /proc/sys"),
    # ---- launch/export.py
    Case("export-out-exists", "export", ("--model={model}", "--format=safetensors", "--out={ws}/existing.safetensors"),
         r"existing\.safetensors already exists; .*--overwrite"),
    Case("export-out-is-dir", "export", ("--model={model}", "--format=safetensors", "--out={ws}/adir"), r"adir is a directory"),
    Case("export-format", "export", ("--model={model}", "--format=onnx", "--out={ws}/m.onnx"), r"unknown export format 'onnx'"),
    Case("export-model-missing", "export", ("--model={ws}/nomodel", "--format=safetensors", "--out={ws}/m.safetensors"),
         r"--model .*nomodel is not a directory \(not found\)"),
    Case("export-model-and-workdir", "export", ("--model={model}", "--workdir={ws}/adir", "--format=diffusers", "--out={ws}/d"),
         r"exactly one of --model DIR or --workdir DIR"),
    Case("export-step-negative", "export", ("--workdir={ws}/adir", "--step=-1", "--format=safetensors", "--out={ws}/m.safetensors"),
         r"--step=-1 is out of range"),
    Case("export-dtype", "export", ("--model={model}", "--format=safetensors", "--dtype=float64", "--out={ws}/m.safetensors"),
         r"--dtype=float64: value should be one of"),
    # ---- launch/prepare_data.py
    Case("prepare-images-missing", "prepare_data", ("--images={ws}/nope", "--out={ws}/ds"), r"--images .*nope is not a directory \(not found\)"),
    Case("prepare-images-is-file", "prepare_data", ("--images={ws}/notes.txt", "--out={ws}/ds"), r"notes\.txt is a file"),
    Case("prepare-all-corrupt", "prepare_data", ("--images={ws}/corrupt", "--out={ws}/ds", "--noprogress"),
         r"no usable images under .*corrupt: all 3 were skipped .*nothing was written"),
    Case("prepare-all-corrupt-existing-out", "prepare_data", ("--images={ws}/corrupt", "--out={ws}/full_dir", "--noprogress"),
         r"no usable images"),
    Case("prepare-test-fraction-nan", "prepare_data", ("--synthetic=4", "--out={ws}/ds", "--test_fraction=nan"),
         r"--test_fraction=nan is not a finite"),
    Case("prepare-test-fraction-range", "prepare_data", ("--synthetic=4", "--out={ws}/ds", "--test_fraction=1"),
         r"--test_fraction=1(\.0)? is out of range: .*\[0, 1\)"),
    Case("prepare-shard-size", "prepare_data", ("--synthetic=4", "--out={ws}/ds", "--shard_size=0"), r"--shard_size=0 is out of range"),
    Case("prepare-out-is-file", "prepare_data", ("--synthetic=4", "--out={ws}/notes.txt"), r"--out .*notes\.txt is a file"),
    Case("prepare-synthetic-zero", "prepare_data", ("--synthetic=0", "--out={ws}/ds"), r"--synthetic=0 is out of range"),
    Case("prepare-synthetic-size", "prepare_data", ("--synthetic=4", "--size=8", "--out={ws}/ds"), r"--size=8 is out of range"),
    Case("prepare-both-sources", "prepare_data", ("--synthetic=4", "--images={ws}/corrupt", "--out={ws}/ds"), r"either --images or --synthetic"),
    Case("prepare-pidinet-no-weights", "prepare_data", ("--images={ws}/corrupt", "--sketcher=pidinet", "--out={ws}/ds"),
         r"--pidinet_weights"),
    Case("prepare-num-threads", "prepare_data", ("--images={ws}/corrupt", "--num_threads=0", "--out={ws}/ds"),
         r"--num_threads=0 is out of range"),
    # ---- launch/evaluate.py
    Case("evaluate-num-negative", "evaluate", evaluate("--num=-1"), r"--num=-1 is out of range"),
    Case("evaluate-batch-zero", "evaluate", evaluate("--batch_size=0"), r"--batch_size=0 is out of range"),
    Case("evaluate-guidance-inf", "evaluate", evaluate("--guidance_scale=inf"), r"--guidance_scale=inf is not a finite"),
    Case("evaluate-steps-not-int", "evaluate", evaluate("--steps=ten"), r"flag --steps=ten: invalid literal"),
    Case("evaluate-data-missing", "evaluate", ("--model={model}", "--data={ws}/nope", "--out={ws}/r.json"), r"--data .*nope is not a directory \(not found\)"),
    Case("evaluate-out-is-dir", "evaluate", ("--model={model}", "--data={ws}/data", "--out={ws}/adir"), r"adir is a directory"),
    Case("evaluate-out-extension", "evaluate", ("--model={model}", "--data={ws}/data", "--out={ws}/r.txt"), r"unknown file extension '\.txt'; use \.json"),
    Case("evaluate-no-model", "evaluate", ("--data={ws}/data", "--out={ws}/r.json"), r"give --model"),
    # ---- launch/train.py (the config file and --config.KEY overrides included)
    Case("train-override-not-int", "train", train("--config.total_steps=abc"), r"flag --config\.total_steps=abc: invalid literal"),
    Case("train-override-unknown-key", "train", train("--config.optim.learning_rate=1e-4"),
         r"bad flag --config\.optim\.learning_rate: the config has no such key"),
    Case("train-config-missing", "train", ("--config={ws}/no_config.py", "--workdir={ws}/run"),
         r"--config .*no_config\.py: cannot load it \(\[Errno 2\] No such file or directory"),
    Case("train-config-variant", "train", train(config="configs/demo.py:nonsense"), r"unknown config variant 'nonsense'"),
    Case("train-lr-nan", "train", train("--config.optim.lr=nan"), r"--config\.optim\.lr=nan is not a finite"),
    Case("train-steps-zero", "train", train("--config.total_steps=0"), r"--config\.total_steps=0 is out of range"),
    Case("train-ema-one", "train", train("--config.ema_decay=1.0"), r"--config\.ema_decay=1\.0 is out of range: .*\[0, 1\)"),
    Case("train-init-from-missing", "train", train("--config.init_from={ws}/nomodel"), r"--config\.init_from .*nomodel is not a directory"),
    Case("train-data-missing", "train", train("--config.data.dir={ws}/nodata", "--config.data.synthetic_images=0"),
         r"--config\.data\.dir .*nodata is not a directory"),
    Case("train-workdir-is-file", "train", (f"--config={REPO_ROOT}/configs/demo.py", "--workdir={ws}/notes.txt"),
         r"--workdir .*notes\.txt is a file"),
    Case("train-dtype", "train", train("--config.compute_dtype=float16"), r"compute_dtype='float16': use float32 or bfloat16"),
]


def _make_workspace(ws: pathlib.Path, e2e: pathlib.Path) -> None:
    """The user's files the cases point at (each must come out unchanged)."""
    shutil.copy(e2e / "image.png", ws / "existing.png")
    shutil.copy(e2e / "image.png", ws / "pic_grid.png")
    (ws / "existing.safetensors").write_bytes(b"the user's weights")
    (ws / "adir").mkdir()
    (ws / "adir" / "keep.txt").write_text("inside a directory given as a file\n")
    (ws / "full_dir").mkdir()
    (ws / "full_dir" / "mine.txt").write_text("the user's file\n")
    (ws / "notes.txt").write_text("0.1 0.2 0.3\nthese are notes, not an array\n")
    (ws / "data").mkdir()  # an (empty) dataset folder: evaluate's checks run before it is read
    noise = np.load(e2e / "noise.npy")
    nan_noise = noise.copy()
    nan_noise[0, 0, 0, 0] = np.nan
    np.save(ws / "nan_noise.npy", nan_noise)
    inf_noise = noise.copy()
    inf_noise[0, 1, 2, 3], inf_noise[0, 2, 3, 4] = np.inf, -np.inf
    np.save(ws / "inf_noise.npy", inf_noise)
    np.save(ws / "nhwc_noise.npy", noise.transpose(0, 2, 3, 1))
    np.save(ws / "objects.npy", np.array([{"not": "numbers"}], dtype=object), allow_pickle=True)
    np.savez(ws / "arrays.npz", noise=noise)
    Image.new("1", (14000, 14000)).save(ws / "huge.png")  # 196 MP, 24 kB: the decompression bomb
    Image.new("RGB", (1, 1), (200, 10, 10)).save(ws / "one_pixel.png")
    Image.open(e2e / "mask.png").resize((32, 32)).save(ws / "mask32.png")
    Image.open(e2e / "sketch.png").resize((80, 64)).save(ws / "sketch_wide.png")
    (ws / "corrupt").mkdir()
    (ws / "corrupt" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (ws / "corrupt" / "b.png").write_bytes(b"")
    (ws / "corrupt" / "c.webp").write_text("not an image")


def _snapshot(*roots: pathlib.Path) -> dict[str, str]:
    """{path: sha256} of every file (and '<dir>' for every directory) under `roots`."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _run(case: Case, fill: dict[str, str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    args = [a.format(**fill) for a in case.args]
    return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / f"{case.tool}.py"), *args], cwd=cwd,
                          env=CLI_ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model_dir, fixtures_dir, e2e):
    """Runs every case once (4 at a time) → ({case id: CompletedProcess}, snapshot before, snapshot after)."""
    ws = tmp_path_factory.mktemp("user_files")
    _make_workspace(ws, e2e)
    fill = {"ws": str(ws), "model": str(tiny_model_dir), "e2e": str(e2e), "fixtures": str(fixtures_dir)}
    before = _snapshot(ws, tiny_model_dir)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {c.id: pool.submit(_run, c, fill, ws) for c in CASES}
        results = {k: f.result() for k, f in futures.items()}
    return results, before, _snapshot(ws, tiny_model_dir)


def test_table_has_forty_cases_over_six_tools():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES} == {"sample", "convert", "export", "prepare_data", "evaluate", "train"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line(table, case):
    proc = table[0][case.id]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{case.tool}.py: error: "), lines[0]
    assert re.search(case.expect, lines[0]), lines[0]


def test_no_user_file_changed(table):
    _, before, after = table
    assert after == before  # nothing changed, created (a partial output, `_prepare/`, empty shards) or removed


# ------------------------------------------------------------------ the good paths next to the checks


def test_sample_overwrite_replaces_the_file_and_leaves_no_temporaries(tiny_model_dir, e2e, tmp_path):
    out = tmp_path / "out.png"
    out.write_bytes(b"an old result")
    cmd = [sys.executable, str(REPO_ROOT / "launch" / "sample.py"), "--model", str(tiny_model_dir), "--image",
           "image.png", "--mask", "mask.png", "--sketch", "sketch.png", "--reference", "reference.png", "--out",
           str(out), "--steps", "2", "--noise", "noise.npy", "--overwrite"]
    proc = subprocess.run(cmd, cwd=e2e, capture_output=True, text=True, env=CLI_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Image.open(out).size == (64, 64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_api_warns_when_it_stretches_a_mask(pipe, e2e, caplog):
    """The library (the app, notebooks) keeps stretching a mask/sketch of another size, with a warning;
    launch/sample.py refuses it (table above)."""
    mask = Image.open(e2e / "mask.png").resize((32, 32))
    with caplog.at_level("WARNING", logger="sketchcomp_jax.pipeline"):
        prepared = pipe.preprocess(e2e / "image.png", mask, None, e2e / "reference.png")
    assert prepared.keep_mask.shape == (1, 64, 64, 1)
    assert "mask is 32x32 but the image is 64x64" in caplog.text


def test_api_refuses_what_the_cli_refuses(pipe, e2e, tmp_path):
    """The same limits through the Python API: a 1×1 source array, a bomb-sized file (refused from its header,
    without decoding 196 MP), a directory given as an image, an inverted box."""
    with pytest.raises(ValueError, match="1x1; each side must be at least 8"):
        pipe.preprocess(np.zeros((1, 1, 3), np.uint8), e2e / "mask.png", None, e2e / "reference.png")
    Image.new("1", (14000, 14000)).save(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="196.0 megapixels, above the limit"):
        pipe.preprocess(tmp_path / "huge.png", e2e / "mask.png", None, e2e / "reference.png")
    with pytest.raises(ValueError, match="is a directory, not an image file"):
        pipe.preprocess(e2e / "image.png", e2e / "mask.png", None, tmp_path)
    with pytest.raises(ValueError, match="inverted or empty"):
        pipe.preprocess(e2e / "image.png", e2e / "mask.png", None, None, reference_box=(30, 5, 10, 40))


# ------------------------------------------------------------------ scripts/setup_venv.sh


def _checkout(root: pathlib.Path) -> pathlib.Path:
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "setup_venv.sh", root / "scripts")
    (root / "setup.py").write_text("# stands for the project's setup.py\n")
    return root


def _setup_venv(root: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "setup_venv.sh")], capture_output=True, text=True, timeout=120)


def test_setup_venv_touches_only_its_own_venv(tmp_path):
    a = _checkout(tmp_path / "a")
    # A venv without pip: any install attempt would fail, so exit 0 proves nothing was reinstalled.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(a / ".venv")], check=True)
    (a / ".venv" / ".sketchcomp-installed").touch()
    proc = _setup_venv(a)
    assert proc.returncode == 0, proc.stderr
    assert (a / ".venv" / ".sketchcomp-project").read_text().strip() == str(a.resolve())
    before = _snapshot(a / ".venv")

    shared = _checkout(tmp_path / "b")
    (shared / ".venv").symlink_to(a / ".venv")
    recorded = _checkout(tmp_path / "c")
    (recorded / ".venv").mkdir()
    shutil.copy(a / ".venv" / ".sketchcomp-project", recorded / ".venv")
    copied = _checkout(tmp_path / "d")
    shutil.copytree(a / ".venv", copied / ".venv", symlinks=True)
    (copied / ".venv" / ".sketchcomp-project").unlink()  # as a venv made before the marker: bin/activate decides
    for root, why in ((shared, "is a symlink to"), (recorded, "belongs to the checkout"), (copied, "was created at")):
        snap = _snapshot(root / ".venv")
        proc = _setup_venv(root)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and why in lines[0], proc.stderr
        assert lines[0].startswith("setup_venv.sh: error: ")
        assert _snapshot(root / ".venv") == snap
    assert _snapshot(a / ".venv") == before

"""The training loop end to end: falling loss, resume = uninterrupted run, restore on another mesh,
preemption by SIGTERM, and a real 2-process (CPU collectives) run."""
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs.demo import get_config
from sketchcomp_jax.train.loop import train

from tests.conftest import REPO_ROOT, tiny_demo_config


def tiny_cfg(data_dir, **overrides):
    return tiny_demo_config(data_dir, **overrides)


def metrics(workdir):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data") / "synthetic"


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_full")
    summary = train(tiny_cfg(data_dir), str(workdir))
    return workdir, summary


def test_uninterrupted_run_logs_and_checkpoints(uninterrupted):
    workdir, summary = uninterrupted
    rows = metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert summary["stop_reason"] == "finished" and summary["step"] == 6
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 6]
    assert summary["flops_per_step"] and summary["flops_per_step"] > 0


def test_resume_reproduces_the_uninterrupted_run(uninterrupted, data_dir, tmp_path):
    full_dir, _ = uninterrupted
    cfg = tiny_cfg(data_dir, total_steps=3)
    train(cfg, str(tmp_path))
    resumed = train(tiny_cfg(data_dir), str(tmp_path))
    assert resumed["step"] == 6
    a, b = metrics(full_dir), metrics(tmp_path)
    assert [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5)


def test_restore_on_a_different_mesh(uninterrupted, data_dir, tmp_path):
    import shutil

    full_dir, _ = uninterrupted
    shutil.copytree(full_dir / "checkpoints", tmp_path / "checkpoints")
    for step in (6,):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    (tmp_path / "metrics.jsonl").write_text((full_dir / "metrics.jsonl").read_text())
    cfg = tiny_cfg(data_dir, **{"mesh.ici": {"data": 2, "fsdp": 2, "tensor": 1}, "mesh.strategy": "fsdp",
                                "mesh.fsdp_min_size": 256})
    devices = jax.devices()[:4]
    from sketchcomp_jax.parallel import mesh as mesh_mod

    original = mesh_mod.make_mesh
    try:
        import sketchcomp_jax.train.loop as loop_mod

        loop_mod.make_mesh = lambda ici, dcn=None: original(ici, dcn, devices=devices)
        summary = train(cfg, str(tmp_path))
    finally:
        loop_mod.make_mesh = original
    assert summary["step"] == 6
    a, b = metrics(full_dir), metrics(tmp_path)
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-4)


def _cli(workdir, data_dir, *extra, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env.update(env_extra or {})
    return [sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--config", str(REPO_ROOT / "configs" / "demo.py"),
            "--workdir", str(workdir), f"--config.data.dir={data_dir}", "--config.data.synthetic_images=24",
            "--config.batch_size=4", "--config.sample_every=0", "--config.eval_every=0", "--config.log_every=1",
            *extra], env


def test_sigterm_saves_and_the_rerun_resumes(data_dir, tmp_path):
    """SIGTERM between log steps (log_every is huge): the checkpoint AND every metrics row up to it are saved."""
    import threading

    cmd, env = _cli(tmp_path, data_dir, "--config.total_steps=100000", "--config.checkpoint_every=100000",
                    "--config.log_every=100000")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    chunks = []  # the progress bar is the only sign of progress: no rows are logged before the signal
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(64), "")), daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(int(n) >= 3 for n in re.findall(r"(\d+)/100000", "".join(chunks))):
            break
        time.sleep(0.2)
    assert not (tmp_path / "metrics.jsonl").exists() or not metrics(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    out = "".join(chunks)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, saved[0] + 1))  # flushed at the preemption
    cmd, env = _cli(tmp_path, data_dir, f"--config.total_steps={saved[0] + 2}")
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, saved[0] + 3))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # tests/test_multihost.py::test_two_process_fsdp_run_samples_and_evaluates covers more in the default suite
def test_two_process_training(tmp_path):
    # process 0 makes the data set while process 1 waits at a barrier (tests/test_multihost.py: FSDP, sampling,
    # eval, preemption)
    data_dir = tmp_path / "data"
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd, env = _cli(tmp_path / "run", data_dir, "--config.total_steps=4", "--config.checkpoint_every=2",
                        "--config.batch_size=8",
                        f"--config.distributed.coordinator=127.0.0.1:{port}",
                        "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
                        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                   "SKETCHCOMP_CPU_COLLECTIVES": "gloo"})
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_trained_run_exports_and_converts_back(uninterrupted, tmp_path):
    from sketchcomp_jax.train.checkpointing import load_training_params
    from sketchcomp_jax.weights.export import export
    from sketchcomp_jax.weights.sources import convert_checkpoint

    workdir, _ = uninterrupted
    paths = export(tmp_path / "trained.ckpt", "ldm", workdir=str(workdir))
    config, params, _, step = load_training_params(workdir, 6)
    assert step == 6
    back, _ = convert_checkpoint(paths[0], ldm_config=tmp_path / "trained.yaml",
                                 clip_config=tmp_path / "trained_clip_config.json", resolution=config.resolution)
    assert back.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.params, params)


def test_trained_unet_and_vae_run_identically_in_pytorch(uninterrupted):
    """JAX → PyTorch: the trained U-Net and VAE, exported to diffusers' layout, compute what ours compute."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from sketchcomp_jax.models.config import build_networks
    from sketchcomp_jax.models.vae import AutoencoderKL as FlaxVAE
    from sketchcomp_jax.train.checkpointing import load_training_params
    from sketchcomp_jax.weights.export_diffusers import diffusers_configs, diffusers_state_dicts

    workdir, _ = uninterrupted
    config, params, _, _ = load_training_params(workdir, 6)
    configs, sds = diffusers_configs(config), diffusers_state_dicts(config, params)
    drop = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    unet_t = UNet2DConditionModel(**drop(configs["unet"])).eval()
    unet_t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sds["unet"].items()}, strict=True)
    vae_t = AutoencoderKL(**drop(configs["vae"])).eval()
    vae_t.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sds["vae"].items()}, strict=True)
    nets = build_networks(config)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 16, 16, 12)).astype(np.float32)
    ctx = rng.standard_normal((2, 1, config.context_dim)).astype(np.float32)
    t = np.array([7, 640])
    ours = np.asarray(nets.unet.apply({"params": params["unet"]}, x, t, ctx))
    with torch.no_grad():
        ref = unet_t(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                     encoder_hidden_states=torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    z = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ours = np.asarray(nets.vae.apply({"params": params["vae"]}, z, method=FlaxVAE.decode))
    with torch.no_grad():
        ref = vae_t.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def _tensorboard_scalars(logdir):
    """{tag: [(step, value)]} from the TensorBoard event files (TFRecord framing + Event protos)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                out.setdefault(value.tag, []).append((event.step, value.simple_value if kind == "simple_value" else kind))
    return out


def test_metrics_go_to_tensorboard_too(uninterrupted):
    workdir, _ = uninterrupted
    scalars = _tensorboard_scalars(workdir / "tensorboard")
    losses = [r["loss"] for r in metrics(workdir)]
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], losses, rtol=1e-6)
    for tag in ("train/lr", "train/grad_norm", "perf/images_per_second", "perf/tflops_per_device"):
        assert tag in scalars, sorted(scalars)


def test_loss_falls_on_the_demo_config(data_dir, tmp_path):
    """The demo recipe (lr 2e-4, 20 warm-up steps, batch 8) learns: the mean loss of steps 31-40 is clearly
    below that of steps 1-10 (each step draws its own timesteps, so single steps are noisy)."""
    cfg = tiny_cfg(data_dir, total_steps=40, checkpoint_every=40)
    cfg.optim.warmup_steps = get_config().optim.warmup_steps
    train(cfg, str(tmp_path))
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10]), losses


def _truncate_largest_file(directory):
    """Damages a checkpoint as a crash mid-copy or a full disk would: its largest data file loses its tail."""
    largest = max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(largest, "r+b") as f:
        f.truncate(largest.stat().st_size // 2)


def test_resume_skips_a_corrupt_latest_checkpoint_and_a_torn_metrics_line(uninterrupted, data_dir, tmp_path, caplog):
    """Latest checkpoint (6) truncated, metrics.jsonl ending in half a row: the resume warns once for each,
    moves step 6 aside (kept), resumes from 3 and reproduces the uninterrupted losses exactly (same programs
    and data on the same CPU: bit-equal)."""
    full_dir, _ = uninterrupted
    shutil.copytree(full_dir / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(full_dir / "model_config.json", tmp_path)
    _truncate_largest_file(tmp_path / "checkpoints" / "6" / "state")
    torn = (full_dir / "metrics.jsonl").read_text() + '{"step": 7, "loss": 0.5'
    (tmp_path / "metrics.jsonl").write_text(torn)
    with caplog.at_level(logging.WARNING):
        summary = train(tiny_cfg(data_dir), str(tmp_path))
    assert summary["step"] == 6
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    skipped = [w for w in warnings if w.startswith("checkpoint step 6 ") and "could not be restored" in w]
    assert len(skipped) == 1 and "OUT_OF_RANGE" in skipped[0] and len(skipped[0]) < 700, warnings
    assert any(str(tmp_path / "metrics.jsonl") in w and "last line" in w for w in warnings), warnings
    assert (tmp_path / "checkpoints_unrestorable" / "6" / "state").is_dir()  # kept, not deleted
    a, b = metrics(full_dir), metrics(tmp_path)
    assert [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_array_equal([r["loss"] for r in b], [r["loss"] for r in a])


def _tiny_checkpoints(directory, steps):
    from sketchcomp_jax.train.checkpointing import Checkpointer

    ckpt = Checkpointer(directory, max_to_keep=10, async_save=False)
    for step in steps:
        ckpt.save(step, {"w": np.full((64, 64), step, np.float32)}, None, {"step": step}, force=True)
    return ckpt


def test_restore_falls_back_to_the_newest_good_step(tmp_path):
    ckpt = _tiny_checkpoints(tmp_path, [1, 2, 3])
    for step in (2, 3):
        _truncate_largest_file(tmp_path / "checkpoints" / str(step) / "state")
    abstract = {"w": jax.ShapeDtypeStruct((64, 64), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    step, state = ckpt.restore_latest_good(abstract, None)
    assert step == 1 and float(state["w"][0, 0]) == 1.0
    assert ckpt.all_steps() == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints_unrestorable").iterdir()) == ["2", "3"]
    ckpt.save(2, {"w": np.zeros((64, 64), np.float32)}, None, {}, force=True)  # the step number is free again
    assert ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_no_restorable_checkpoint_is_one_error_and_nothing_moves(tmp_path):
    from sketchcomp_jax.train.checkpointing import UnrestorableCheckpoint

    ckpt = _tiny_checkpoints(tmp_path, [1, 2])
    wrong_shape = {"w": jax.ShapeDtypeStruct((32, 32), np.float32,
                                             sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    with pytest.raises(UnrestorableCheckpoint, match=r"step 2: .*; step 1: .*use the config the run was started"):
        ckpt.restore_latest_good(wrong_shape, None)
    assert ckpt.all_steps() == [1, 2] and not (tmp_path / "checkpoints_unrestorable").exists()
    ckpt.close()


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from sketchcomp_jax.train.metrics_writer import MetricsWriter

    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    writer = MetricsWriter(tmp_path, tensorboard=False)
    with caplog.at_level(logging.WARNING):
        writer.truncate_after(3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(tmp_path / "metrics.jsonl") in warning and "last line" in warning

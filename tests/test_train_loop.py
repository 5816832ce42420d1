"""The training loop end to end: falling loss, resume = uninterrupted run, restore on another mesh,
preemption by SIGTERM, and a real 2-process (CPU collectives) run."""
import json
import os
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
    cmd, env = _cli(tmp_path, data_dir, "--config.total_steps=100000", "--config.checkpoint_every=100000")
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted" in out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    cmd, env = _cli(tmp_path, data_dir, f"--config.total_steps={saved[0] + 2}")
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, saved[0] + 3))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training(data_dir, tmp_path):
    # make the data set first so both processes find it complete
    from sketchcomp_jax.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(str(data_dir), 24, seed=0)
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd, env = _cli(tmp_path, data_dir, "--config.total_steps=4", "--config.checkpoint_every=2",
                        "--config.batch_size=8", "--config.data.synthetic_images=0",
                        f"--config.distributed.coordinator=127.0.0.1:{port}",
                        "--config.distributed.num_processes=2", f"--config.distributed.process_id={pid}",
                        env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                   "SKETCHCOMP_CPU_COLLECTIVES": "gloo"})
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


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
    from sketchcomp_jax.weights.export import diffusers_configs, diffusers_state_dicts

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

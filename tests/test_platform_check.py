"""`platform_check`: the backend line of launch/train.py and the warning for a TPU/GPU host running jax on the CPU.

The tests run on the CPU backend, so an accelerator host is simulated through the environment (the TPU VM
variables) and through the device-file lookup (`glob`).
"""
import jax

from sketchcomp_jax import platform_check as pc


def test_describe_backend_names_backend_and_device_kind():
    line = pc.describe_backend()
    assert f"jax {jax.__version__}, backend cpu: {jax.device_count()} × cpu" in line


def test_warns_on_tpu_host_running_cpu_jax(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setenv("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    warning = pc.accelerator_warning()
    assert warning is not None and "TPU machine ($TPU_ACCELERATOR_TYPE=v5litepod-8)" in warning
    assert ".[tpu]" in warning and "JAX_PLATFORMS=cpu" in warning
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # CPU on purpose: no warning
    assert pc.accelerator_warning() is None


def test_warns_on_gpu_host_and_not_on_a_plain_host(monkeypatch):
    for var in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pc.glob, "glob", lambda p: ["/dev/nvidia0"] if p.startswith("/dev/nvidia") else [])
    assert pc.host_accelerator() == ("gpu", "/dev/nvidia0")
    assert ".[cuda12]" in pc.accelerator_warning()
    monkeypatch.setattr(pc.glob, "glob", lambda p: [])
    assert pc.host_accelerator() is None and pc.accelerator_warning() is None

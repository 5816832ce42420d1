"""Which backend JAX runs on, and whether the host looks like it has an accelerator that JAX does not use.

`launch/train.py` prints `describe_backend()` at start and `accelerator_warning()` (when not None) to stderr: a
plain `pip install -e .` gets the CPU build of jaxlib, and on a TPU VM or a GPU machine that silently trains on
the CPU. The host checks only look at device files and environment variables (no subprocess, no network).
"""
from __future__ import annotations

import glob
import os
import sys

# What to install for each accelerator (README "Accelerators"; setup.py extras).
INSTALL_HINT = {
    "tpu": "pip install -e '.[tpu]'  (or: pip install 'jax[tpu]')",
    "gpu": "pip install -e '.[cuda12]'  (or: pip install 'jax[cuda12]')",
}


def host_accelerator() -> tuple[str, str] | None:
    """('tpu' | 'gpu', evidence) when this host looks like a TPU VM or an NVIDIA GPU machine, else None.

    TPU: the TPU VM environment (`TPU_ACCELERATOR_TYPE`, `TPU_NAME`, `TPU_WORKER_ID`) or TPU device files
    (`/dev/accel*`, `/dev/vfio/<n>`). GPU: `/dev/nvidia<n>` device files.
    """
    for var in ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_ID"):
        if os.environ.get(var):
            return "tpu", f"${var}={os.environ[var]}"
    accel = sorted(glob.glob("/dev/accel[0-9]*")) + sorted(p for p in glob.glob("/dev/vfio/[0-9]*"))
    if accel:
        return "tpu", accel[0]
    nvidia = sorted(glob.glob("/dev/nvidia[0-9]*"))
    if nvidia:
        return "gpu", nvidia[0]
    return None


def describe_backend() -> str:
    """'jax 0.x.y, backend gpu: 8 × NVIDIA H100 80GB HBM3 (process 0 of 1)' — initialises JAX's backend."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(devices)} × {', '.join(kinds)} "
            f"(process {jax.process_index()} of {jax.process_count()})")


def accelerator_warning() -> str | None:
    """A one-line warning when the host has a TPU / GPU but JAX runs on the CPU, naming the install that fixes it.

    None when JAX uses an accelerator, when the host shows none, or when `JAX_PLATFORMS` asks for the CPU (a
    deliberate choice, as in the tests).
    """
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return None
    import jax

    if jax.default_backend() != "cpu":
        return None
    found = host_accelerator()
    if found is None:
        return None
    kind, evidence = found
    return (f"this host looks like a {kind.upper()} machine ({evidence}) but jax runs on the CPU (jaxlib without "
            f"{kind.upper()} support?): install it with {INSTALL_HINT[kind]}, or set JAX_PLATFORMS=cpu to train "
            "on the CPU on purpose")


def report_backend(tool: str) -> None:
    """Prints `<tool>: <describe_backend()>` to stdout and `<tool>: warning: <accelerator_warning()>` (if any) to
    stderr. Call it after `jax.distributed.initialize` (it initialises the backend)."""
    print(f"{tool}: {describe_backend()}", flush=True)
    warning = accelerator_warning()
    if warning:
        print(f"{tool}: warning: {warning}", file=sys.stderr, flush=True)

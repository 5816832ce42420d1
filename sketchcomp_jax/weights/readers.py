"""Safe, torch-free readers for weights files: PyTorch checkpoints, safetensors, diffusers folders.

PyTorch `.ckpt` / `.pt` / `.pth` / `.bin` files are pickles, and unpickling an untrusted pickle can run
arbitrary code. They are read here by our own restricted unpickler, which never imports torch and never
imports anything named in the file:

* the globals that rebuild tensors (`torch._utils._rebuild_tensor_v2`, storage classes, dtypes, ...)
  resolve to *our* numpy implementations;
* plain containers and value types (`collections.OrderedDict`, `builtins.set`, numpy scalars, ...)
  resolve to the real, harmless constructors;
* bookkeeping objects of known-benign libraries that Lightning stores next to the weights
  (`omegaconf.*`, `pytorch_lightning.*`, `lightning.*`, `argparse.Namespace`, `pathlib.*`, ...) become
  inert stand-ins (`InertObject`) that record their name and arguments and do nothing else;
* any other global (`os.system`, `builtins.eval`, `subprocess.*`, an unknown class, ...) stops the read
  with `UnsafeCheckpointError` *before* it is called. Pickle extension-registry opcodes are refused too.

Tensors are rebuilt lazily: only the tensors of the returned state dict are read from disk (a Lightning
checkpoint's optimizer state is parsed but its storages are never loaded), and every stride / offset is
bounds-checked against its storage before numpy looks at it.

Supported containers: the torch zip format (torch >= 1.6, `<archive>/data.pkl` + `<archive>/data/<key>`),
the legacy torch format (torch < 1.6: magic-number pickle, storages appended), and safetensors (parsed
here, so bfloat16 / float8 work; `safetensors.numpy` has no bfloat16). All readers return flat
`{name: np.ndarray}` dicts with the stored dtype (bfloat16 and float8 as `ml_dtypes` types); every
array owns its memory and is writable.

This module sniffs the format and dispatches; the work is done by `torch_unpickler.py` (the restricted
unpickler), `torch_files.py` (zip / legacy containers), `safetensors_io.py`, and `folders.py` (diffusers /
transformers model folders, which read their weights files through `read_state_dict`).
"""
from __future__ import annotations

import io
import os
import pathlib
import struct
from typing import Literal

import numpy as np

from sketchcomp_jax.weights.errors import (
    CheckpointError,
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiffusersFolderError,
    NotAStateDictError,
    UnknownFormatError,
    UnsafeCheckpointError,
)
from sketchcomp_jax.weights.read_common import REDOWNLOAD_HINT, require_exists
from sketchcomp_jax.weights.safetensors_io import read_safetensors
from sketchcomp_jax.weights.torch_files import read_torch_legacy, read_torch_zip
from sketchcomp_jax.weights.torch_unpickler import InertObject, RestrictedUnpickler

__all__ = [
    "DIFFUSERS_COMPONENTS",
    "PICKLE_SUFFIXES",
    "CheckpointError",
    "CheckpointIsADirectoryError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DiffusersFolderError",
    "Format",
    "InertObject",
    "NotAStateDictError",
    "UnknownFormatError",
    "UnsafeCheckpointError",
    "detect_format",
    "read_state_dict",
]

Format = Literal["ldm_ckpt", "safetensors", "diffusers", "torch_pickle_legacy"]
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_COMPONENTS = ("unet", "vae", "image_encoder")

# --------------------------------------------------------------------------------------------------
# Sniffing and public API
# --------------------------------------------------------------------------------------------------


def _sniff(path: pathlib.Path) -> str:
    """'zip' | 'safetensors' | 'pickle' for a file, from its first bytes (the extension is ignored)."""
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes); {REDOWNLOAD_HINT}")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= 100 * 2**20:
        return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"PK\x05\x06"):
        raise CorruptCheckpointError(f"{path}: an empty zip archive; {REDOWNLOAD_HINT}")
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        hint = "it is a git-lfs pointer file, not the weights: run `git lfs pull` (or download the file itself)"
    elif text.startswith((b"<!doctype html", b"<html", b"<?xml")):
        hint = "it is an HTML/XML page (a failed or gated download?): download the weights file again"
    elif len(head) > 262 and head[257:262] == b"ustar":
        hint = "it is a tar archive (the pre-1.0 torch format?): load it with an old torch and re-save it as safetensors"
    else:
        hint = f"first bytes {head[:16]!r}; if it should be a checkpoint, {REDOWNLOAD_HINT}"
    raise UnknownFormatError(
        f"{path}: not a PyTorch checkpoint (zip or legacy pickle) nor a safetensors file; {hint}"
    )


def _refuse_if_unsafe_pickle(path: pathlib.Path) -> None:
    """Raises `UnsafeCheckpointError` if `path` parses as a pickle that references a disallowed global."""
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(1 << 20))
        try:
            RestrictedUnpickler(head, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - not a (dangerous) pickle: the caller's error stands
            pass


def looks_like_diffusers(path: pathlib.Path) -> bool:
    return (path / "model_index.json").is_file() or any((path / c).is_dir() for c in DIFFUSERS_COMPONENTS)



def detect_format(path: str | os.PathLike) -> Format:
    """What kind of weights source `path` is, from its content (not its extension).

    Returns 'diffusers' (a pipeline folder with `model_index.json` or a `unet/`, `vae/` or
    `image_encoder/` subfolder), 'ldm_ckpt' (a PyTorch zip-format checkpoint, e.g. an LDM / Lightning
    `.ckpt`), 'safetensors', or 'torch_pickle_legacy' (a pre-1.6 torch pickle file).
    Raises `CheckpointNotFoundError`, `CheckpointIsADirectoryError` (a folder that is not a diffusers
    pipeline), `CorruptCheckpointError` (empty file) or `UnknownFormatError`.
    """
    path = require_exists(path)
    if path.is_dir():
        if looks_like_diffusers(path):
            return "diffusers"
        raise CheckpointIsADirectoryError(
            f"{path}: a directory but not a diffusers pipeline folder (no model_index.json and no "
            f"{'/, '.join(DIFFUSERS_COMPONENTS)}/ subfolder); pass a weights file or a diffusers folder"
        )
    return {"zip": "ldm_ckpt", "safetensors": "safetensors", "pickle": "torch_pickle_legacy"}[_sniff(path)]


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one weights file into a flat `{name: np.ndarray}` dict, without torch and without executing
    anything from the file.

    Formats (sniffed from the content): safetensors; PyTorch zip checkpoints (`.ckpt`, `.pt`, `.pth`,
    `.bin`); legacy (torch < 1.6) PyTorch files. For a Lightning checkpoint the model state dict is its
    `'state_dict'` entry (else a `'model'` or `'module'` entry, else the top-level dict itself). Dtypes
    are kept (bfloat16 / float8 as `ml_dtypes`); strided / offset views are copied into contiguous arrays.

    Raises (all `CheckpointError`s naming the path): `CheckpointNotFoundError`,
    `CheckpointIsADirectoryError`, `CorruptCheckpointError`, `UnknownFormatError`,
    `UnsafeCheckpointError` (a pickled global outside the allow-list; nothing executed) and
    `NotAStateDictError`.
    """
    path = require_exists(path)
    if path.is_dir():
        hint = (
            "it looks like a diffusers pipeline folder: use read_diffusers_folder(path)"
            if looks_like_diffusers(path)
            else "pass the weights file inside it"
        )
        raise CheckpointIsADirectoryError(f"{path}: a directory, not a weights file; {hint}")
    try:
        kind = _sniff(path)
    except UnknownFormatError:
        _refuse_if_unsafe_pickle(path)  # e.g. a protocol-0 pickle: say "unsafe" rather than "unknown"
        raise
    if kind == "safetensors":
        return read_safetensors(path)
    if kind == "zip":
        return read_torch_zip(path)
    return read_torch_legacy(path)

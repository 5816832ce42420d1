"""Safe, torch-free readers for weight files: PyTorch zip checkpoints, safetensors, diffusers folders.

PyTorch `.ckpt/.pt/.pth/.bin` files are pickles. They are read by our own restricted unpickler: only
the globals that rebuild tensors are resolved (to our own numpy implementations, never to torch);
bookkeeping objects of known-benign libraries (Lightning, omegaconf, argparse, pathlib) become inert
placeholders; any other global (`os.system`, `builtins.eval`, …) stops the read with
`UnsafeCheckpointError` before anything is called. Nothing in the file is ever imported or executed.

All readers return flat `{name: np.ndarray}` dicts with the stored dtype (bfloat16 as `ml_dtypes`).
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import os
import pathlib
import pickle
import struct
import zipfile
from typing import Any, Literal

import ml_dtypes
import numpy as np

from sketchcomp_jax.weights.errors import CheckpointError


class UnsafeCheckpointError(CheckpointError):
    """The pickle references a global that could execute code; nothing was executed."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated or damaged."""


class UnknownFormatError(CheckpointError):
    """The file is none of the supported weight formats."""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
Format = Literal["ldm_ckpt", "safetensors", "diffusers", "torch_pickle_legacy"]

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}
# Libraries whose pickled objects appear in Lightning checkpoints next to the weights (hyper-parameters,
# callbacks, loop state). They are replaced by inert placeholders; none of their code is imported.
_BENIGN_PREFIXES = ("omegaconf", "pytorch_lightning", "lightning", "lightning_fabric", "argparse", "pathlib",
                    "torch.torch_version", "torchmetrics", "ldm.")
_SAFE_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice, "bytearray": bytearray}


class _DtypeMarker:
    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)


class Placeholder:
    """Stands in for an object of a benign library; records what it was and does nothing else."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder {self.qualname}>"


class _Storage:
    def __init__(self, archive: zipfile.ZipFile, prefix: str, key: str, dtype: np.dtype, path: pathlib.Path):
        self.archive, self.prefix, self.key, self.dtype, self.path = archive, prefix, key, dtype, path
        self._data = None

    def array(self) -> np.ndarray:
        if self._data is None:
            try:
                raw = self.archive.read(f"{self.prefix}/data/{self.key}")
            except (KeyError, zipfile.BadZipFile, EOFError, OSError, zipfile.LargeZipFile) as e:
                raise CorruptCheckpointError(
                    f"{self.path}: tensor storage {self.key} is missing or damaged ({e}); the file is probably "
                    "truncated — download it again"
                ) from None
            self._data = np.frombuffer(raw, dtype=self.dtype)
        return self._data


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise CheckpointError("malformed checkpoint: a tensor does not reference a storage")
    base = storage.array()
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    needed = offset + (sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0)
    if needed > base.size:
        raise CorruptCheckpointError(f"{storage.path}: tensor data of storage {storage.key} is shorter than its shape")
    view = np.lib.stride_tricks.as_strided(
        base[offset:], shape=size, strides=tuple(s * base.itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *state):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


def _reconstructor(cls, base, state):
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls()
    raise UnsafeCheckpointError(f"refusing to load: copyreg._reconstructor of {cls!r}; nothing was executed")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): Placeholder,
    ("torch", "Tensor"): Placeholder,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "object"): object,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}
# numpy scalars / arrays (e.g. a step counter) pickle through these two constructors, which only build arrays.
_NUMPY_MULTIARRAY = {"scalar", "_reconstruct"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: pathlib.Path, archive: zipfile.ZipFile | None = None, prefix: str = ""):
        super().__init__(file)
        self.path, self.archive, self.prefix = path, archive, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        # Protocol-2 pickles (torch.save's default) use Python 2 module names, e.g. `__builtin__`.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in _NUMPY_MULTIARRAY:
            from numpy._core import multiarray

            return getattr(multiarray, name)
        if module == "torch" and name in _STORAGE_DTYPES:
            return _DtypeMarker(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _DtypeMarker(_TORCH_DTYPES[name])
        if module == "builtins" and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if module.startswith(_BENIGN_PREFIXES) or (module, name) == ("__main__", "Namespace"):
            return type(name, (Placeholder,), {"qualname": f"{module}.{name}"})
        raise UnsafeCheckpointError(
            f"refusing to load {self.path}: its pickle references '{module}.{name}', which could run code. "
            "Nothing was executed. If the file is trusted, re-save its state dict as .safetensors "
            "(e.g. safetensors.torch.save_file(torch.load(f)['state_dict'], 'model.safetensors'))."
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r:.80} in the pickle")
        if self.archive is None:
            raise CheckpointError(f"{self.path}: storage reference outside a zip checkpoint")
        marker, key = pid[1], str(pid[2])
        if not isinstance(marker, _DtypeMarker):
            raise CheckpointError(f"{self.path}: unsupported storage type {marker!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(self.archive, self.prefix, key, marker.dtype, self.path)
        return self.storages[key]


def _flatten_state_dict(obj: Any, path: pathlib.Path) -> dict[str, np.ndarray]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, np.ndarray) for v in inner.values()):
                obj = inner
                break
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: the pickle holds no state dict of tensors (top-level {type(obj).__name__}"
        + (f" with keys {list(obj)[:8]}" if isinstance(obj, dict) else "") + ")"
    )


def _read_torch_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
        names = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable zip archive ({e}); the file is probably truncated — download it again") from None
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
        raise UnknownFormatError(f"{path}: a zip file without data.pkl is not a PyTorch checkpoint")
    prefix = pkl[0][: -len("/data.pkl")] if "/" in pkl[0] else ""
    byteorder = f"{prefix}/byteorder"
    if byteorder in names and archive.read(byteorder).strip() not in (b"little", b""):
        raise CheckpointError(f"{path}: big-endian checkpoints are not supported")
    try:
        data = archive.read(pkl[0])
        obj = _RestrictedUnpickler(io.BytesIO(data), path, archive, prefix).load()
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, pickle.UnpicklingError, struct.error) as e:
        raise CorruptCheckpointError(f"{path}: damaged checkpoint ({type(e).__name__}: {e}); download it again") from None
    return _flatten_state_dict(obj, path)


_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
    "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100 * 2**20):
            raise CorruptCheckpointError(f"{path}: safetensors header length {header_len} exceeds the file; truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    data_start = 8 + header_len
    buffer = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: bad header entry for {name!r}: {info!r:.100}") from None
        if data_start + end > size:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} lies past the end of the file; the file is truncated — download it again")
        if (end - begin) != int(np.prod(shape)) * dtype.itemsize:
            raise CorruptCheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
        out[name] = np.array(buffer[data_start + begin: data_start + end].view(dtype).reshape(shape))
    return out


def _read_legacy_pickle(path: pathlib.Path) -> dict[str, np.ndarray]:
    # Pre-1.6 torch files are a sequence of pickles plus raw storage bytes. Probe the first pickle with
    # the restricted unpickler so that code-running files are refused before torch ever sees them.
    with open(path, "rb") as f:
        try:
            _RestrictedUnpickler(f, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception:
            pass
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path}: legacy (pre-zip) PyTorch format; install the torch extra (pip install -e .[torch]) "
            "to read it, or re-save it with a recent torch"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"refusing to load {path}: {str(e).splitlines()[0]}; nothing was executed") from None
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: cannot read legacy PyTorch file ({type(e).__name__}: {e})") from None

    def to_numpy(v):
        if isinstance(v, torch.Tensor):
            return v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
        if isinstance(v, dict):
            return {k: to_numpy(x) for k, x in v.items()}
        return v

    return _flatten_state_dict(to_numpy(obj), path)


def detect_format(path: str | os.PathLike) -> Format:
    """Sniffs what `path` is: a diffusers folder, a PyTorch zip checkpoint, safetensors, or a legacy pickle."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights not found: {path}")
    if path.is_dir():
        if (path / "model_index.json").is_file() or any((path / c).is_dir() for c in ("unet", "vae", "image_encoder")):
            return "diffusers"
        raise UnknownFormatError(f"{path} is a directory but not a diffusers folder (no model_index.json, unet/, vae/ or image_encoder/)")
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04"):
        return "ldm_ckpt"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"\x80"):
        return "torch_pickle_legacy"
    raise UnknownFormatError(
        f"{path}: not a PyTorch checkpoint, safetensors file or diffusers folder (first bytes {head[:8]!r}); "
        "is the download complete?"
    )


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """One weights file → flat `{name: ndarray}` (the Lightning `state_dict` entry where present)."""
    path = pathlib.Path(path)
    fmt = detect_format(path)
    if fmt == "diffusers":
        raise CheckpointError(f"{path} is a diffusers folder; use read_diffusers_folder (convert.py does this itself)")
    if fmt == "safetensors":
        return _read_safetensors(path)
    if fmt == "ldm_ckpt":
        return _read_torch_zip(path)
    return _read_legacy_pickle(path)


_COMPONENTS = ("unet", "vae", "image_encoder")


def _component_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = json.loads(index.read_text())["weight_map"]
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(_read_safetensors(folder / shard))
        return out
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return _read_safetensors(folder / name)
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    candidates = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if candidates:
        return read_state_dict(candidates[0])
    raise CheckpointError(f"{folder}: no weights file (*.safetensors or *.bin)")


def read_diffusers_folder(path: str | os.PathLike) -> dict[str, Any]:
    """A diffusers pipeline folder → `{component: {'config': dict, 'state_dict': dict}}` for the
    `unet`, `vae` and `image_encoder` subfolders present, plus `'model_index'` if there is one."""
    path = pathlib.Path(path)
    out: dict[str, Any] = {}
    for comp in _COMPONENTS:
        folder = path / comp
        if not folder.is_dir():
            continue
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder}: missing config.json")
        out[comp] = {"config": json.loads(config_path.read_text()), "state_dict": _component_weights(folder)}
    if not out:
        raise CheckpointError(f"{path}: none of the subfolders {_COMPONENTS} exists; not a diffusers Paint-by-Example folder")
    if (path / "model_index.json").is_file():
        out["model_index"] = json.loads((path / "model_index.json").read_text())
    return out

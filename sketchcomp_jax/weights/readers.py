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
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import json
import logging
import math
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from typing import Any, Callable, Literal

import ml_dtypes
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
    "read_diffusers_folder",
    "read_state_dict",
]

log = logging.getLogger(__name__)

Format = Literal["ldm_ckpt", "safetensors", "diffusers", "torch_pickle_legacy"]
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_COMPONENTS = ("unet", "vae", "image_encoder")

_RESAVE_HINT = (
    "If you trust the file, re-save its state dict as safetensors in a trusted environment, e.g. "
    "`python -c \"import torch, safetensors.torch as st; ck = torch.load('IN.ckpt', map_location='cpu', "
    "weights_only=False); sd = ck.get('state_dict', ck); st.save_file({k: v.contiguous().clone() for k, v in "
    "sd.items()}, 'OUT.safetensors')\"`, and pass the .safetensors file instead."
)
_REDOWNLOAD_HINT = "the file is probably truncated or damaged: download it again (and compare its size / sha256)"

# --------------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------------

_TORCH_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(dt)
    for names, dt in [
        (("float32", "float"), np.float32),
        (("float64", "double"), np.float64),
        (("float16", "half"), np.float16),
        (("bfloat16",), ml_dtypes.bfloat16),
        (("int64", "long"), np.int64),
        (("int32", "int"), np.int32),
        (("int16", "short"), np.int16),
        (("int8",), np.int8),
        (("uint8",), np.uint8),
        (("uint16",), np.uint16),
        (("uint32",), np.uint32),
        (("uint64",), np.uint64),
        (("bool",), np.bool_),
        (("complex64", "cfloat"), np.complex64),
        (("complex128", "cdouble"), np.complex128),
        (("float8_e4m3fn",), ml_dtypes.float8_e4m3fn),
        (("float8_e5m2",), ml_dtypes.float8_e5m2),
        (("float8_e4m3fnuz",), ml_dtypes.float8_e4m3fnuz),
        (("float8_e5m2fnuz",), ml_dtypes.float8_e5m2fnuz),
    ]
    for name in names
}

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),  # torch >= 2 for dtypes without a legacy storage class
}

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
    "I32": np.dtype(np.int32),
    "U32": np.dtype(np.uint32),
    "I16": np.dtype(np.int16),
    "U16": np.dtype(np.uint16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


def _from_bytes(buf, dtype: np.dtype, count: int, little_endian: bool) -> np.ndarray:
    """`count` elements of `dtype` from `buf`; byte-swapped into native order when needed (a copy then)."""
    arr = np.frombuffer(buf, dtype=dtype, count=count)
    if dtype.itemsize > 1 and little_endian != (sys.byteorder == "little"):
        if dtype.kind == "c":  # swap the real and imaginary parts separately
            half = np.dtype(f"u{dtype.itemsize // 2}")
            arr = arr.view(half).byteswap().view(dtype)
        else:
            arr = arr.view(np.dtype(f"u{dtype.itemsize}")).byteswap().view(dtype)
    return arr


# --------------------------------------------------------------------------------------------------
# Objects the restricted unpickler produces
# --------------------------------------------------------------------------------------------------


class InertObject:
    """Stand-in for an object of a benign library (omegaconf, Lightning, argparse, pathlib, ...).

    Each pickled global of those namespaces becomes a fresh subclass whose `pickle_global` is the
    `module.name` from the file. Constructing it, `__setstate__`, item assignment and `append` only
    record what the pickle passed; no code of the named library is imported or run.
    """

    pickle_global = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.__dict__.update(args=args, kwargs=kwargs, state=None, items={}, elements=[])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __setitem__(self, key, value):
        self.items[key] = value

    def append(self, value):
        self.elements.append(value)

    def extend(self, values):
        self.elements.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.pickle_global}>"


class _Token:
    """A named, non-callable marker for a torch object (dtype, storage class, Tensor class)."""

    __slots__ = ("kind", "name", "dtype")

    def __init__(self, kind: str, name: str, dtype: np.dtype | None = None):
        self.kind, self.name, self.dtype = kind, name, dtype

    def __repr__(self) -> str:
        return f"<torch {self.kind} {self.name}>"


class _StorageRef:
    """A storage of the file: bytes not read until a tensor of the returned state dict needs them."""

    __slots__ = ("source", "key", "dtype", "byte_offset", "nbytes", "root_nbytes")

    def __init__(self, source, key: str, dtype: np.dtype, byte_offset: int, nbytes: int, root_nbytes: int):
        self.source, self.key, self.dtype = source, key, dtype
        self.byte_offset, self.nbytes, self.root_nbytes = byte_offset, nbytes, root_nbytes


class _TensorRef:
    """A tensor of the file: a bounds-checked strided view of a `_StorageRef`, materialised on demand."""

    __slots__ = ("storage", "offset", "shape", "strides", "dtype", "neg", "conj")

    def __init__(self, storage, offset, shape, strides, dtype, neg=False, conj=False):
        self.storage, self.offset, self.shape, self.strides = storage, offset, shape, strides
        self.dtype, self.neg, self.conj = dtype, neg, conj

    def __repr__(self) -> str:
        return f"<tensor {self.dtype} {self.shape}>"


# --------------------------------------------------------------------------------------------------
# The restricted unpickler
# --------------------------------------------------------------------------------------------------

# Modules whose objects may appear in Lightning checkpoints next to the weights (hyper-parameters,
# callbacks, loop state). Their globals become inert stand-ins; nothing is imported.
_INERT_MODULES = (
    "omegaconf",
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "lightning_utilities",
    "pathlib",
    "typing",
    "ldm",  # the original code base's own classes (e.g. in hyper_parameters)
)
_INERT_GLOBALS = {
    ("argparse", "Namespace"),
    ("torch", "device"),
    ("torch.torch_version", "TorchVersion"),
}
_SAFE_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "dict", "list", "tuple",
                 "int", "float", "str", "bool", "object")
}
# Tensor kinds torch can pickle that this reader does not rebuild: a clear error instead of "unsafe".
_UNSUPPORTED_TORCH = {
    ("torch._utils", "_rebuild_qtensor"): "quantized tensors",
    ("torch._utils", "_rebuild_sparse_tensor"): "sparse tensors",
    ("torch._utils", "_rebuild_nested_tensor"): "nested tensors",
    ("torch._utils", "_rebuild_meta_tensor_no_storage"): "meta tensors (no data)",
    ("torch._utils", "_rebuild_wrapper_subclass"): "tensor subclasses",
    ("torch._utils", "_rebuild_device_tensor_from_numpy"): "device tensors stored as numpy arrays",
    ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): "device tensors",
    ("torch._utils", "_rebuild_xla_tensor"): "XLA tensors",
    ("torch._utils", "_rebuild_mtia_tensor"): "MTIA tensors",
    ("torch.storage", "_load_from_bytes"): "storages pickled outside torch.save",
    ("torch", "QInt8Storage"): "quantized tensors",
    ("torch", "QUInt8Storage"): "quantized tensors",
    ("torch", "QInt32Storage"): "quantized tensors",
    ("torch", "QUInt4x2Storage"): "quantized tensors",
    ("torch", "QUInt2x4Storage"): "quantized tensors",
}


def _index(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} is {type(value).__name__}, not an int")
    return value


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{what} is {type(value).__name__}, not a tuple")
    return tuple(_index(v, what) for v in value)


class _RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler whose `find_class` only hands out allow-listed, side-effect-free callables.

    The pure-Python implementation is used (not the C one) so that the extension-registry opcodes, which
    can bypass `find_class` through `copyreg`'s cache, can be refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path: pathlib.Path, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="utf-8")
        self.path = path
        self._persistent = persistent_load
        self._inert_classes: dict[str, type] = {}
        self._rebuilders = {
            self._rebuild_tensor,
            self._rebuild_tensor_v2,
            self._rebuild_tensor_v3,
            self._rebuild_parameter,
            self._rebuild_parameter_with_state,
        }

    # ---- opcodes -----------------------------------------------------------------------------------

    def _refuse_extension(self):
        raise UnsafeCheckpointError(
            f"refusing to load {self.path}: its pickle uses the extension registry (EXT opcodes), which "
            f"bypasses the allow-list. Nothing was executed. {_RESAVE_HINT}"
        )

    dispatch[pickle.EXT1[0]] = _refuse_extension
    dispatch[pickle.EXT2[0]] = _refuse_extension
    dispatch[pickle.EXT4[0]] = _refuse_extension

    _BUILD_TARGETS = (InertObject, collections.OrderedDict, collections.defaultdict, np.ndarray, np.dtype)

    def _load_build(self):
        # BUILD sets state on the object below it; only allow it on objects whose state is plain data, so
        # the pickle cannot modify our tensor / storage records or the functions handed out by find_class.
        inst, state = self.stack[-2], self.stack[-1]
        if not isinstance(inst, self._BUILD_TARGETS):
            raise UnsafeCheckpointError(
                f"refusing to load {self.path}: its pickle sets the state of a {type(inst).__name__} object, which "
                f"is outside the allow-list. Nothing was executed. {_RESAVE_HINT}"
            )
        if isinstance(inst, dict):
            parts = state if isinstance(state, tuple) and len(state) == 2 else (state, None)
            for part in parts:
                if part is not None and not (
                    isinstance(part, dict) and all(isinstance(k, str) and not k.startswith("__") for k in part)
                ):
                    raise CorruptCheckpointError(f"{self.path}: unexpected state {state!r:.80} for a dict")
        pickle._Unpickler.load_build(self)

    dispatch[pickle.BUILD[0]] = _load_build

    def persistent_load(self, pid):
        if self._persistent is None:
            raise CorruptCheckpointError(f"{self.path}: unexpected persistent id {pid!r:.100} in the pickle")
        return self._persistent(pid)

    # ---- globals -----------------------------------------------------------------------------------

    def find_class(self, module: str, name: str):
        if self.proto < 3:  # Python-2 style names, e.g. `__builtin__.set`, `copy_reg._reconstructor`
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        obj = self._resolve(module, name)
        if obj is None:
            raise UnsafeCheckpointError(
                f"refusing to load {self.path}: its pickle references the global '{module}.{name}', which could "
                f"run code and is not on the allow-list of tensor and container types. Nothing was executed "
                f"(the name was not imported or called). {_RESAVE_HINT}"
            )
        return obj

    def _resolve(self, module: str, name: str):
        key = (module, name)
        if module in ("torch._utils", "torch._tensor", "torch.tensor", "torch.nn.parameter", "torch", "torch.storage"):
            found = self._resolve_torch(module, name)
            if found is not None:
                return found
        if key in _UNSUPPORTED_TORCH:
            raise UnknownFormatError(
                f"{self.path}: the checkpoint contains {_UNSUPPORTED_TORCH[key]} ('{module}.{name}'), which "
                f"this reader does not support; re-save the state dict with dense CPU tensors as safetensors. "
                f"Nothing was executed."
            )
        if module == "collections":
            if name == "OrderedDict":
                return collections.OrderedDict
            if name == "defaultdict":
                return self._defaultdict
        if module == "builtins" and name in _SAFE_BUILTINS:
            return _SAFE_BUILTINS[name]
        if key == ("copyreg", "_reconstructor"):
            return self._reconstructor
        if key == ("_codecs", "encode"):
            return _codecs_encode
        if key == ("operator", "getitem"):
            return self._inert_getitem
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray"):
            return _NUMPY_GLOBALS.get(key)
        if key in _INERT_GLOBALS or any(module == m or module.startswith(m + ".") for m in _INERT_MODULES):
            return self._inert_class(f"{module}.{name}")
        return None

    def _resolve_torch(self, module: str, name: str):
        if module == "torch._utils":
            return {
                "_rebuild_tensor": self._rebuild_tensor,
                "_rebuild_tensor_v2": self._rebuild_tensor_v2,
                "_rebuild_tensor_v3": self._rebuild_tensor_v3,
                "_rebuild_parameter": self._rebuild_parameter,
                "_rebuild_parameter_with_state": self._rebuild_parameter_with_state,
            }.get(name)
        if module in ("torch._tensor", "torch.tensor") and name == "_rebuild_from_type_v2":
            return self._rebuild_from_type_v2
        if (module, name) == ("torch.nn.parameter", "Parameter") or (module, name) == ("torch", "Tensor"):
            return _Token("class", f"{module}.{name}")
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return _Token("storage", name, _STORAGE_DTYPES[name])
            if name in _TORCH_DTYPES:
                return _Token("dtype", name, _TORCH_DTYPES[name])
            if name == "Size":
                return _torch_size
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _Token("storage", name, _STORAGE_DTYPES[name])
        return None

    def _inert_class(self, qualname: str) -> type:
        cls = self._inert_classes.get(qualname)
        if cls is None:
            cls = type(qualname.rsplit(".", 1)[-1], (InertObject,), {"pickle_global": qualname})
            self._inert_classes[qualname] = cls
        return cls

    # ---- restricted helpers (only ever called with objects the pickle built from allowed globals) ----

    def _unsafe_call(self, what: str):
        return UnsafeCheckpointError(
            f"refusing to load {self.path}: {what}; this is outside the allow-list. Nothing was executed. "
            f"{_RESAVE_HINT}"
        )

    def _defaultdict(self, default_factory=None, *args):
        ok = default_factory is None or default_factory in _SAFE_BUILTINS.values() or (
            isinstance(default_factory, type) and issubclass(default_factory, InertObject)
        )
        if not ok:
            raise self._unsafe_call(f"collections.defaultdict with factory {default_factory!r:.80}")
        return collections.defaultdict(default_factory, *args)

    def _reconstructor(self, cls, base, state):
        if isinstance(cls, type) and issubclass(cls, InertObject):
            return cls(state)
        raise self._unsafe_call(f"copyreg._reconstructor of {cls!r:.80}")

    def _inert_getitem(self, obj, key):
        if isinstance(obj, InertObject) or (isinstance(obj, type) and issubclass(obj, InertObject)):
            return self._inert_class("operator.getitem")(obj, key)  # e.g. typing.Dict[str, Any]
        raise self._unsafe_call(f"operator.getitem on {type(obj).__name__}")

    # ---- tensors -------------------------------------------------------------------------------------

    def _tensor_ref(self, storage, storage_offset, size, stride, dtype: np.dtype | None, metadata=None):
        if not isinstance(storage, _StorageRef):
            raise CorruptCheckpointError(
                f"{self.path}: a tensor in the pickle does not reference a storage (got {type(storage).__name__})"
            )
        try:
            offset = _index(storage_offset, "storage offset")
            shape = _int_tuple(size, "tensor size")
            strides = _int_tuple(stride, "tensor stride")
            if len(shape) != len(strides):
                raise ValueError(f"size {shape} and stride {strides} differ in length")
            if offset < 0 or any(n < 0 for n in shape) or any(s < 0 for s in strides):
                raise ValueError(f"negative offset / size / stride ({offset}, {shape}, {strides})")
        except ValueError as e:
            raise CorruptCheckpointError(f"{self.path}: malformed tensor metadata in storage {storage.key}: {e}") from None
        dtype = storage.dtype if dtype is None else dtype
        if all(shape):  # non-empty: the last element must lie inside the storage
            available = storage.nbytes // dtype.itemsize
            last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
            if last >= available:
                raise CorruptCheckpointError(
                    f"{self.path}: a tensor of shape {shape} (stride {strides}, offset {offset}) reaches element "
                    f"{last} of storage {storage.key}, which holds only {available}; {_REDOWNLOAD_HINT}"
                )
        metadata = metadata if isinstance(metadata, dict) else {}
        return _TensorRef(storage, offset, shape, strides, dtype, bool(metadata.get("neg")), bool(metadata.get("conj")))

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor_ref(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        return self._tensor_ref(storage, storage_offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        if not (isinstance(dtype, _Token) and dtype.kind == "dtype"):
            raise CorruptCheckpointError(f"{self.path}: _rebuild_tensor_v3 without a torch dtype (got {dtype!r:.80})")
        return self._tensor_ref(storage, storage_offset, size, stride, dtype.dtype, metadata)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad=False, backward_hooks=None, state=None):
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func not in self._rebuilders or not (isinstance(new_type, _Token) and new_type.kind == "class"):
            raise self._unsafe_call(f"torch._tensor._rebuild_from_type_v2 with {func!r:.80} / {new_type!r:.80}")
        return func(*args)


def _torch_size(dims=()):
    return tuple(_index(d, "torch.Size entry") for d in dims)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles store `bytes` as _codecs.encode(str, 'latin1'); allow exactly that kind of call.
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise UnsafeCheckpointError(f"refusing _codecs.encode with encoding {encoding!r:.40}; nothing was executed")
    return obj.encode(encoding, errors)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    def reconstruct(subtype, shape, dtype_code):
        if subtype is not np.ndarray:
            raise UnsafeCheckpointError(f"refusing numpy _reconstruct of {subtype!r:.80}; nothing was executed")
        return multiarray._reconstruct(np.ndarray, shape, dtype_code)

    def scalar(dtype, data=None):
        if not isinstance(dtype, np.dtype):
            raise UnsafeCheckpointError(f"refusing numpy scalar of {dtype!r:.80}; nothing was executed")
        return multiarray.scalar(dtype, data) if data is not None else multiarray.scalar(dtype)

    out: dict[tuple[str, str], Any] = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = reconstruct
        out[(mod, "scalar")] = scalar
    return out


_NUMPY_GLOBALS = _numpy_globals()


def _unpickle(unpickler: _RestrictedUnpickler, path: pathlib.Path, what: str = "the pickle") -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: {what} is nested too deeply to read") from None
    except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is "damaged"
        raise CorruptCheckpointError(
            f"{path}: cannot parse {what} ({type(e).__name__}: {e}); {_REDOWNLOAD_HINT}"
        ) from e


# --------------------------------------------------------------------------------------------------
# Storage sources and materialisation
# --------------------------------------------------------------------------------------------------


class _ZipSource:
    def __init__(self, archive: zipfile.ZipFile, prefix: str, path: pathlib.Path, little_endian: bool):
        self.archive, self.prefix, self.path, self.little_endian = archive, prefix, path, little_endian

    def read(self, key: str, nbytes: int) -> bytearray:
        name = f"{self.prefix}data/{key}"
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CorruptCheckpointError(f"{self.path}: storage '{name}' is missing from the archive; {_REDOWNLOAD_HINT}") from None
        if info.file_size < nbytes:
            raise CorruptCheckpointError(
                f"{self.path}: storage '{name}' has {info.file_size} bytes, the pickle expects {nbytes}; {_REDOWNLOAD_HINT}"
            )
        buf = bytearray(nbytes)
        try:
            with self.archive.open(info) as f:
                got = f.readinto(buf)
                if got == nbytes and info.file_size == nbytes:
                    f.read(1)  # reach EOF so that zipfile verifies the CRC
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zipfile.LargeZipFile) as e:
            raise CorruptCheckpointError(f"{self.path}: storage '{name}' is damaged ({e}); {_REDOWNLOAD_HINT}") from None
        if got != nbytes:
            raise CorruptCheckpointError(f"{self.path}: storage '{name}' is truncated; {_REDOWNLOAD_HINT}")
        return buf


class _LegacySource:
    def __init__(self, file, path: pathlib.Path, little_endian: bool):
        self.file, self.path, self.little_endian = file, path, little_endian
        self.offsets: dict[str, int] = {}

    def read(self, key: str, nbytes: int) -> bytearray:
        if key not in self.offsets:
            raise CorruptCheckpointError(f"{self.path}: storage {key} is referenced but not stored; {_REDOWNLOAD_HINT}")
        self.file.seek(self.offsets[key])
        buf = bytearray(nbytes)
        if self.file.readinto(buf) != nbytes:
            raise CorruptCheckpointError(f"{self.path}: storage {key} is truncated; {_REDOWNLOAD_HINT}")
        return buf


def _materialize(tensors: dict[str, Any], path: pathlib.Path) -> dict[str, np.ndarray]:
    """`_TensorRef`s → owned, writable numpy arrays (storages read once, freed after their last use)."""
    users: collections.Counter = collections.Counter()
    for value in tensors.values():
        if isinstance(value, _TensorRef):
            users[(id(value.storage.source), value.storage.key)] += 1
    cache: dict[tuple[int, str], bytearray] = {}
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if isinstance(value, np.ndarray):
            out[name] = np.array(value)
            continue
        st, dtype = value.storage, value.dtype
        if 0 in value.shape:
            out[name] = np.zeros(value.shape, dtype)
            continue
        ckey = (id(st.source), st.key)
        raw = cache.get(ckey)
        if raw is None:
            raw = cache[ckey] = st.source.read(st.key, st.root_nbytes)
        users[ckey] -= 1
        buf = memoryview(raw)[st.byte_offset: st.byte_offset + st.nbytes]
        flat = _from_bytes(buf, dtype, st.nbytes // dtype.itemsize, st.source.little_endian)
        view = np.lib.stride_tricks.as_strided(
            flat[value.offset:], shape=value.shape, strides=tuple(s * dtype.itemsize for s in value.strides),
            writeable=False,
        )
        sole_owner = (
            users[ckey] == 0 and flat.base is not None and flat.flags.writeable and value.offset == 0
            and view.size == flat.size and view.flags.c_contiguous and st.byte_offset == 0 and st.nbytes == len(raw)
        )
        arr = flat.reshape(value.shape) if sole_owner else view.copy()
        if value.neg:
            arr = np.negative(arr)
        if value.conj:
            arr = np.conj(arr)
        out[name] = arr
        if users[ckey] == 0:
            del cache[ckey]
    return out


def _describe(obj: Any) -> str:
    if isinstance(obj, InertObject):
        return repr(obj)
    if isinstance(obj, _TensorRef):
        return "tensor"
    return type(obj).__name__


def _select_state_dict(obj: Any, path: pathlib.Path) -> dict[str, Any]:
    """The flat model state dict inside a loaded checkpoint (Lightning `state_dict`, `model`, `module`,
    or the object itself)."""
    if not isinstance(obj, dict):
        raise NotAStateDictError(
            f"{path}: the checkpoint holds a {_describe(obj)}, not a dict of tensors (a state dict or a "
            "Lightning checkpoint with a 'state_dict' entry)"
        )
    where, candidate = "the top-level dict", obj
    for key in ("state_dict", "model", "module"):
        if isinstance(obj.get(key), dict):
            where, candidate = f"the '{key}' entry", obj[key]
            break
    bad = [
        k for k, v in candidate.items()
        if not isinstance(k, str)
        or not (isinstance(v, _TensorRef) or (isinstance(v, np.ndarray) and not v.dtype.hasobject))
    ]
    if bad or not candidate:
        listing = ", ".join(f"{k!r:.60}: {_describe(candidate[k])}" for k in bad[:6]) + (" ..." if len(bad) > 6 else "")
        top = ", ".join(repr(k)[:60] for k in list(obj)[:10])
        raise NotAStateDictError(
            f"{path}: {where} is not a flat dict of tensors ("
            + (f"non-tensor entries: {listing}" if bad else "it is empty")
            + f"; top-level keys: {top}). Expected a state dict, or a Lightning checkpoint whose 'state_dict' "
            "(or 'model' / 'module') entry is one."
        )
    return candidate


# --------------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------------


def _read_torch_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable zip archive ({e}); {_REDOWNLOAD_HINT}") from None
    with archive:
        names = archive.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise UnknownFormatError(
                f"{path}: a TorchScript archive (torch.jit.save), not a checkpoint; save the model's "
                "state_dict() with safetensors (or torch.save) instead"
            )
        pkls = [n for n in names if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pkls) != 1:
            raise UnknownFormatError(
                f"{path}: a zip archive with {len(pkls)} data.pkl records, not a PyTorch checkpoint "
                f"(first entries: {names[:5]})"
            )
        prefix = pkls[0][: -len("data.pkl")]
        try:
            byteorder = archive.read(prefix + "byteorder").strip().decode() if prefix + "byteorder" in names else "little"
            data = archive.read(pkls[0])
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: damaged archive record ({e}); {_REDOWNLOAD_HINT}") from None
        if byteorder not in ("little", "big"):
            raise CorruptCheckpointError(f"{path}: unknown byteorder record {byteorder!r:.20}")
        source = _ZipSource(archive, prefix, path, byteorder == "little")
        storages: dict[str, _StorageRef] = {}

        def persistent_load(pid):
            if not isinstance(pid, tuple) or len(pid) != 5 or _ascii(pid[0]) != "storage":
                raise UnknownFormatError(f"{path}: unsupported persistent id {pid!r:.100} (not a tensor storage)")
            _, storage_type, key, _location, numel = pid
            dtype = _storage_dtype(storage_type, path)
            key = _ascii(key)
            if not isinstance(key, (str, int)) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
                raise CorruptCheckpointError(f"{path}: malformed storage reference {pid!r:.100}")
            key = str(key)
            if key not in storages:
                nbytes = numel * dtype.itemsize
                storages[key] = _StorageRef(source, key, dtype, 0, nbytes, nbytes)
            return storages[key]

        obj = _unpickle(_RestrictedUnpickler(io.BytesIO(data), path, persistent_load), path, f"'{pkls[0]}'")
        return _materialize(_select_state_dict(obj, path), path)


def _ascii(value):
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _storage_dtype(storage_type, path: pathlib.Path) -> np.dtype:
    if isinstance(storage_type, _Token) and storage_type.kind in ("storage", "dtype"):
        return storage_type.dtype
    raise CorruptCheckpointError(f"{path}: storage reference with unknown storage type {storage_type!r:.80}")


class _BoundedReader:
    """File wrapper whose `read(n)` never asks for more than the bytes left, so that a bogus length in a
    damaged pickle cannot make the reader allocate a huge buffer."""

    def __init__(self, file, size: int):
        self._file, self._size = file, size

    def read(self, n: int = -1) -> bytes:
        left = max(self._size - self._file.tell(), 0)
        return self._file.read(left if n is None or n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self._file.readline()

    def readinto(self, buf) -> int:
        return self._file.readinto(buf)

    def seek(self, pos: int) -> int:
        return self._file.seek(pos)

    def tell(self) -> int:
        return self._file.tell()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _read_torch_legacy(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as raw_file:
        f = _BoundedReader(raw_file, size)
        magic = _unpickle(_RestrictedUnpickler(f, path), path)
        if magic != _LEGACY_MAGIC:
            raise UnknownFormatError(
                f"{path}: a plain Python pickle, not a PyTorch checkpoint (no torch magic number); only "
                "torch.save files and safetensors are read"
            )
        protocol = _unpickle(_RestrictedUnpickler(f, path), path)
        if protocol != _LEGACY_PROTOCOL:
            raise UnknownFormatError(f"{path}: legacy torch file with unsupported protocol {protocol!r:.40}")
        sys_info = _unpickle(_RestrictedUnpickler(f, path), path)
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        source = _LegacySource(f, path, little_endian)
        roots: dict[str, tuple[np.dtype, int]] = {}

        def persistent_load(pid):
            if isinstance(pid, tuple) and pid and _ascii(pid[0]) == "module":
                raise UnknownFormatError(
                    f"{path}: the file pickles whole nn.Module classes (torch.save(model)); load it with torch "
                    f"in a trusted environment and save model.state_dict() instead. {_RESAVE_HINT}"
                )
            if not isinstance(pid, tuple) or len(pid) != 6 or _ascii(pid[0]) != "storage":
                raise UnknownFormatError(f"{path}: unsupported persistent id {pid!r:.100} (not a tensor storage)")
            _, storage_type, root_key, _location, numel, view = pid
            dtype = _storage_dtype(storage_type, path)
            root_key = _ascii(root_key)
            if not isinstance(root_key, (str, int)) or isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
                raise CorruptCheckpointError(f"{path}: malformed storage reference {pid!r:.100}")
            root_key = str(root_key)
            if root_key not in roots:
                roots[root_key] = (dtype, numel * dtype.itemsize)
            root_nbytes = roots[root_key][1]
            if view is None:
                return _StorageRef(source, root_key, dtype, 0, root_nbytes, root_nbytes)
            try:
                _view_key, view_offset, view_size = view
                begin, length = _index(view_offset, "view offset") * dtype.itemsize, _index(view_size, "view size") * dtype.itemsize
            except (TypeError, ValueError):
                raise CorruptCheckpointError(f"{path}: malformed storage view {view!r:.100}") from None
            if begin < 0 or length < 0 or begin + length > root_nbytes:
                raise CorruptCheckpointError(f"{path}: storage view {view!r:.100} lies outside storage {root_key}")
            return _StorageRef(source, root_key, dtype, begin, length, root_nbytes)

        obj = _unpickle(_RestrictedUnpickler(f, path, persistent_load), path)
        keys = _unpickle(_RestrictedUnpickler(f, path), path, "the storage key list")
        if not isinstance(keys, list):
            raise CorruptCheckpointError(f"{path}: malformed storage key list")
        pos = f.tell()
        order = "<q" if little_endian else ">q"
        for key in keys:
            key = str(_ascii(key))
            if key not in roots:
                raise CorruptCheckpointError(f"{path}: stored storage {key} is not referenced by the pickle")
            dtype, nbytes = roots[key]
            f.seek(pos)
            header = f.read(8)
            if len(header) != 8:
                raise CorruptCheckpointError(f"{path}: storage {key} is truncated; {_REDOWNLOAD_HINT}")
            (numel,) = struct.unpack(order, header)
            if numel * dtype.itemsize != nbytes:
                raise CorruptCheckpointError(
                    f"{path}: storage {key} records {numel} elements, the pickle expects {nbytes // dtype.itemsize}"
                )
            source.offsets[key] = pos + 8
            pos += 8 + nbytes
            if pos > size:
                raise CorruptCheckpointError(f"{path}: storage {key} runs past the end of the file; {_REDOWNLOAD_HINT}")
        return _materialize(_select_state_dict(obj, path), path)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: too short ({size} bytes) for a safetensors file; {_REDOWNLOAD_HINT}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path}: the safetensors header claims {header_len} bytes but the file has {size}; {_REDOWNLOAD_HINT}"
            )
        if header_len > 100 * 2**20:
            raise CorruptCheckpointError(f"{path}: safetensors header of {header_len} bytes exceeds the 100 MB limit")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e}); {_REDOWNLOAD_HINT}") from None
        if not isinstance(header, dict):
            raise CorruptCheckpointError(f"{path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_start, data_len = 8 + header_len, size - 8 - header_len
        entries = []
        for name, info in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise UnknownFormatError(
                        f"{path}: tensor {name!r} has safetensors dtype {info['dtype']!r}, which is not supported"
                    )
                shape = _int_tuple(info["shape"], "shape")
                begin, end = (_index(v, "data offset") for v in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CorruptCheckpointError(f"{path}: bad safetensors header entry {name!r}: {info!r:.120}") from None
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
                raise CorruptCheckpointError(
                    f"{path}: tensor {name!r} spans bytes [{begin}, {end}), which does not fit shape {shape} / {dtype}"
                )
            entries.append((begin, end, name, dtype, shape))
        entries.sort(key=lambda e: (e[0], e[1]))
        expected = 0
        for begin, end, name, _, _ in entries:
            if begin != expected:
                raise CorruptCheckpointError(f"{path}: tensor {name!r} overlaps or leaves a gap in the data section")
            expected = end
        if expected > data_len:
            raise CorruptCheckpointError(
                f"{path}: the data section needs {expected} bytes but only {data_len} are present; {_REDOWNLOAD_HINT}"
            )
        out: dict[str, np.ndarray] = {}
        for begin, end, name, dtype, shape in entries:
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CorruptCheckpointError(f"{path}: tensor {name!r} is truncated; {_REDOWNLOAD_HINT}")
            out[name] = _from_bytes(buf, dtype, len(buf) // dtype.itemsize, True).reshape(shape)
    return {name: out[name] for name in header if name in out}  # header order


# --------------------------------------------------------------------------------------------------
# Sniffing and public API
# --------------------------------------------------------------------------------------------------


def _sniff(path: pathlib.Path) -> str:
    """'zip' | 'safetensors' | 'pickle' for a file, from its first bytes (the extension is ignored)."""
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpointError(f"{path}: the file is empty (0 bytes); {_REDOWNLOAD_HINT}")
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= 100 * 2**20:
        return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"PK\x05\x06"):
        raise CorruptCheckpointError(f"{path}: an empty zip archive; {_REDOWNLOAD_HINT}")
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        hint = "it is a git-lfs pointer file, not the weights: run `git lfs pull` (or download the file itself)"
    elif text.startswith((b"<!doctype html", b"<html", b"<?xml")):
        hint = "it is an HTML/XML page (a failed or gated download?): download the weights file again"
    elif len(head) > 262 and head[257:262] == b"ustar":
        hint = "it is a tar archive (the pre-1.0 torch format?): load it with an old torch and re-save it as safetensors"
    else:
        hint = f"first bytes {head[:16]!r}; if it should be a checkpoint, {_REDOWNLOAD_HINT}"
    raise UnknownFormatError(
        f"{path}: not a PyTorch checkpoint (zip or legacy pickle) nor a safetensors file; {hint}"
    )


def _refuse_if_unsafe_pickle(path: pathlib.Path) -> None:
    """Raises `UnsafeCheckpointError` if `path` parses as a pickle that references a disallowed global."""
    with open(path, "rb") as f:
        head = io.BytesIO(f.read(1 << 20))
        try:
            _RestrictedUnpickler(head, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - not a (dangerous) pickle: the caller's error stands
            pass


def _looks_like_diffusers(path: pathlib.Path) -> bool:
    return (path / "model_index.json").is_file() or any((path / c).is_dir() for c in DIFFUSERS_COMPONENTS)


def _require_exists(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or directory (weights not found)")
    return path


def detect_format(path: str | os.PathLike) -> Format:
    """What kind of weights source `path` is, from its content (not its extension).

    Returns 'diffusers' (a pipeline folder with `model_index.json` or a `unet/`, `vae/` or
    `image_encoder/` subfolder), 'ldm_ckpt' (a PyTorch zip-format checkpoint, e.g. an LDM / Lightning
    `.ckpt`), 'safetensors', or 'torch_pickle_legacy' (a pre-1.6 torch pickle file).
    Raises `CheckpointNotFoundError`, `CheckpointIsADirectoryError` (a folder that is not a diffusers
    pipeline), `CorruptCheckpointError` (empty file) or `UnknownFormatError`.
    """
    path = _require_exists(path)
    if path.is_dir():
        if _looks_like_diffusers(path):
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
    path = _require_exists(path)
    if path.is_dir():
        hint = (
            "it looks like a diffusers pipeline folder: use read_diffusers_folder(path)"
            if _looks_like_diffusers(path)
            else "pass the weights file inside it"
        )
        raise CheckpointIsADirectoryError(f"{path}: a directory, not a weights file; {hint}")
    try:
        kind = _sniff(path)
    except UnknownFormatError:
        _refuse_if_unsafe_pickle(path)  # e.g. a protocol-0 pickle: say "unsafe" rather than "unknown"
        raise
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind == "zip":
        return _read_torch_zip(path)
    return _read_torch_legacy(path)


# --------------------------------------------------------------------------------------------------
# diffusers folders
# --------------------------------------------------------------------------------------------------

_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_VARIANT_PREFERENCE = ("fp32", "fp16", "bf16")


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({e})") from None


def _read_sharded(index_path: pathlib.Path) -> dict[str, np.ndarray]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index_path}: a shard index without a 'weight_map'")
    folder = index_path.parent
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or pathlib.PurePath(shard).name != shard or shard in ("", ".", ".."):
            raise CorruptCheckpointError(f"{index_path}: shard name {shard!r:.80} is not a file name in {folder}")
        shards.setdefault(shard, []).append(tensor)
    out: dict[str, np.ndarray] = {}
    for shard, tensors in shards.items():
        shard_path = folder / shard
        if not shard_path.is_file():
            raise DiffusersFolderError(f"{shard_path}: shard listed in {index_path.name} is missing; download it")
        sd = read_state_dict(shard_path)
        missing = [t for t in tensors if t not in sd]
        if missing:
            raise CorruptCheckpointError(f"{shard_path}: lacks tensors listed in {index_path.name}: {missing[:5]}")
        out.update({t: sd[t] for t in tensors})
    return out


def _variant_rank(path: pathlib.Path, stem: str) -> tuple[int, str]:
    variant = path.name[len(stem) + 1:].split(".")[0]
    return (_VARIANT_PREFERENCE.index(variant) if variant in _VARIANT_PREFERENCE else len(_VARIANT_PREFERENCE), variant)


def _component_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
    for ext in (".safetensors", ".bin"):
        for stem in _WEIGHT_STEMS:
            single, index = folder / f"{stem}{ext}", folder / f"{stem}{ext}.index.json"
            if single.is_file():
                return read_state_dict(single)
            if index.is_file():
                return _read_sharded(index)
    for ext in (".safetensors", ".bin"):  # variants: <stem>.<variant><ext> or <stem><ext>.index.<variant>.json
        for stem in _WEIGHT_STEMS:
            singles = [p for p in folder.glob(f"{stem}.*{ext}") if p.name.count(".") == 2 and "-of-" not in p.name]
            indexes = list(folder.glob(f"{stem}{ext}.index.*.json"))
            if singles:
                chosen = min(singles, key=lambda p: _variant_rank(p, stem))
                log.info("%s: using weights variant %s", folder, chosen.name)
                return read_state_dict(chosen)
            if indexes:
                chosen = min(indexes, key=lambda p: p.name)
                log.info("%s: using sharded weights variant %s", folder, chosen.name)
                return _read_sharded(chosen)
    present = sorted(p.name for p in folder.iterdir())[:12]
    raise DiffusersFolderError(
        f"{folder}: no weights file ({', '.join(s + '.safetensors' for s in _WEIGHT_STEMS)}, .bin, or a sharded "
        f"*.index.json); found {present}. The download is incomplete."
    )


def read_diffusers_folder(path: str | os.PathLike) -> dict[str, dict]:
    """Reads a diffusers pipeline folder without torch.

    Returns `{'unet': {'config': dict, 'state_dict': {name: ndarray}}, 'vae': {...}, 'image_encoder':
    {...}}` for those of the three subfolders that exist (each needs `config.json` plus
    `diffusion_pytorch_model.safetensors` / `model.safetensors` / `pytorch_model.bin` style weights,
    possibly sharded with an `*.index.json`, or a `.fp16`-style variant when no plain file exists), plus
    `'model_index'`: the parsed `model_index.json` when the folder has one.

    Raises `CheckpointNotFoundError`, `DiffusersFolderError` (a file, or none of the subfolders, or a
    subfolder without config / weights) and whatever `read_state_dict` raises for a weights file.
    """
    path = _require_exists(path)
    if not path.is_dir():
        raise DiffusersFolderError(f"{path}: a file, not a diffusers pipeline folder; use read_state_dict(path)")
    out: dict[str, dict] = {}
    for comp in DIFFUSERS_COMPONENTS:
        folder = path / comp
        if folder.is_dir():
            config, state_dict = read_transformers_folder(folder)
            out[comp] = {"config": config, "state_dict": state_dict}
    if not out:
        raise DiffusersFolderError(
            f"{path}: none of the subfolders {', '.join(c + '/' for c in DIFFUSERS_COMPONENTS)} exists; not a "
            "diffusers Paint-by-Example pipeline folder"
        )
    if (path / "model_index.json").is_file():
        out["model_index"] = _read_json(path / "model_index.json")
    return out


def read_transformers_folder(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """A transformers / diffusers model folder (`config.json` + weights) → (config dict, state dict), torch-free.

    The weights may be `model.safetensors`, `pytorch_model.bin`, a sharded `*.index.json` or a variant, as in
    `read_diffusers_folder`. Raises `CheckpointNotFoundError` or `DiffusersFolderError` naming what is missing.
    """
    folder = _require_exists(path)
    if not folder.is_dir():
        raise DiffusersFolderError(f"{folder}: a file, not a model folder with config.json and weights")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise DiffusersFolderError(f"{folder}: missing config.json; not a model folder, or the download is incomplete")
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{config_path}: not a JSON object")
    return config, _component_weights(folder)

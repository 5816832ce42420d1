"""The restricted, torch-free unpickler for PyTorch checkpoints (see `weights/readers.py`).

It never imports torch and never imports anything named in the file: tensor-rebuilding globals resolve to our own
numpy stand-ins (`TensorRef` / `StorageRef`, materialised by `weights/torch_files.py`), plain containers to the
real harmless constructors, known-benign bookkeeping classes to `InertObject`, anything else raises
`UnsafeCheckpointError` before it is called.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pathlib
import pickle
from typing import Any, Callable

import ml_dtypes
import numpy as np

from sketchcomp_jax.weights.errors import (
    CheckpointError,
    CorruptCheckpointError,
    UnknownFormatError,
    UnsafeCheckpointError,
)
from sketchcomp_jax.weights.read_common import REDOWNLOAD_HINT, RESAVE_HINT, as_index, as_int_tuple

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


class TorchToken:
    """A named, non-callable marker for a torch object (dtype, storage class, Tensor class)."""

    __slots__ = ("kind", "name", "dtype")

    def __init__(self, kind: str, name: str, dtype: np.dtype | None = None):
        self.kind, self.name, self.dtype = kind, name, dtype

    def __repr__(self) -> str:
        return f"<torch {self.kind} {self.name}>"


class StorageRef:
    """A storage of the file: bytes not read until a tensor of the returned state dict needs them."""

    __slots__ = ("source", "key", "dtype", "byte_offset", "nbytes", "root_nbytes")

    def __init__(self, source, key: str, dtype: np.dtype, byte_offset: int, nbytes: int, root_nbytes: int):
        self.source, self.key, self.dtype = source, key, dtype
        self.byte_offset, self.nbytes, self.root_nbytes = byte_offset, nbytes, root_nbytes


class TensorRef:
    """A tensor of the file: a bounds-checked strided view of a `StorageRef`, materialised on demand."""

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


class RestrictedUnpickler(pickle._Unpickler):
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
            f"bypasses the allow-list. Nothing was executed. {RESAVE_HINT}"
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
                f"is outside the allow-list. Nothing was executed. {RESAVE_HINT}"
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
                f"(the name was not imported or called). {RESAVE_HINT}"
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
            return TorchToken("class", f"{module}.{name}")
        if module == "torch":
            if name in _STORAGE_DTYPES:
                return TorchToken("storage", name, _STORAGE_DTYPES[name])
            if name in _TORCH_DTYPES:
                return TorchToken("dtype", name, _TORCH_DTYPES[name])
            if name == "Size":
                return _torch_size
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return TorchToken("storage", name, _STORAGE_DTYPES[name])
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
            f"{RESAVE_HINT}"
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
        if not isinstance(storage, StorageRef):
            raise CorruptCheckpointError(
                f"{self.path}: a tensor in the pickle does not reference a storage (got {type(storage).__name__})"
            )
        try:
            offset = as_index(storage_offset, "storage offset")
            shape = as_int_tuple(size, "tensor size")
            strides = as_int_tuple(stride, "tensor stride")
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
                    f"{last} of storage {storage.key}, which holds only {available}; {REDOWNLOAD_HINT}"
                )
        metadata = metadata if isinstance(metadata, dict) else {}
        return TensorRef(storage, offset, shape, strides, dtype, bool(metadata.get("neg")), bool(metadata.get("conj")))

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._tensor_ref(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        return self._tensor_ref(storage, storage_offset, size, stride, None, metadata)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        if not (isinstance(dtype, TorchToken) and dtype.kind == "dtype"):
            raise CorruptCheckpointError(f"{self.path}: _rebuild_tensor_v3 without a torch dtype (got {dtype!r:.80})")
        return self._tensor_ref(storage, storage_offset, size, stride, dtype.dtype, metadata)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data

    def _rebuild_parameter_with_state(self, data, requires_grad=False, backward_hooks=None, state=None):
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        if func not in self._rebuilders or not (isinstance(new_type, TorchToken) and new_type.kind == "class"):
            raise self._unsafe_call(f"torch._tensor._rebuild_from_type_v2 with {func!r:.80} / {new_type!r:.80}")
        return func(*args)


def _torch_size(dims=()):
    return tuple(as_index(d, "torch.Size entry") for d in dims)


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


def unpickle(unpickler: RestrictedUnpickler, path: pathlib.Path, what: str = "the pickle") -> Any:
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CorruptCheckpointError(f"{path}: {what} is nested too deeply to read") from None
    except Exception as e:  # noqa: BLE001 - any parse failure of untrusted bytes is "damaged"
        raise CorruptCheckpointError(
            f"{path}: cannot parse {what} ({type(e).__name__}: {e}); {REDOWNLOAD_HINT}"
        ) from e

"""Torch-free readers of PyTorch checkpoint containers: the zip format (torch >= 1.6) and the legacy
format (torch < 1.6), with lazy, bounds-checked storage reads. Parsing is `weights/torch_unpickler.py`'s."""
from __future__ import annotations

import collections
import io
import pathlib
import struct
import zipfile
from typing import Any

import numpy as np

from sketchcomp_jax.weights.errors import (
    CorruptCheckpointError,
    NotAStateDictError,
    UnknownFormatError,
)
from sketchcomp_jax.weights.read_common import REDOWNLOAD_HINT, RESAVE_HINT, as_index, from_bytes
from sketchcomp_jax.weights.torch_unpickler import InertObject, RestrictedUnpickler, StorageRef, TensorRef, TorchToken, unpickle


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
            raise CorruptCheckpointError(f"{self.path}: storage '{name}' is missing from the archive; {REDOWNLOAD_HINT}") from None
        if info.file_size < nbytes:
            raise CorruptCheckpointError(
                f"{self.path}: storage '{name}' has {info.file_size} bytes, the pickle expects {nbytes}; {REDOWNLOAD_HINT}"
            )
        buf = bytearray(nbytes)
        try:
            with self.archive.open(info) as f:
                got = f.readinto(buf)
                if got == nbytes and info.file_size == nbytes:
                    f.read(1)  # reach EOF so that zipfile verifies the CRC
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, zipfile.LargeZipFile) as e:
            raise CorruptCheckpointError(f"{self.path}: storage '{name}' is damaged ({e}); {REDOWNLOAD_HINT}") from None
        if got != nbytes:
            raise CorruptCheckpointError(f"{self.path}: storage '{name}' is truncated; {REDOWNLOAD_HINT}")
        return buf


class _LegacySource:
    def __init__(self, file, path: pathlib.Path, little_endian: bool):
        self.file, self.path, self.little_endian = file, path, little_endian
        self.offsets: dict[str, int] = {}

    def read(self, key: str, nbytes: int) -> bytearray:
        if key not in self.offsets:
            raise CorruptCheckpointError(f"{self.path}: storage {key} is referenced but not stored; {REDOWNLOAD_HINT}")
        self.file.seek(self.offsets[key])
        buf = bytearray(nbytes)
        if self.file.readinto(buf) != nbytes:
            raise CorruptCheckpointError(f"{self.path}: storage {key} is truncated; {REDOWNLOAD_HINT}")
        return buf


def _materialize(tensors: dict[str, Any], path: pathlib.Path) -> dict[str, np.ndarray]:
    """`TensorRef`s → owned, writable numpy arrays (storages read once, freed after their last use)."""
    users: collections.Counter = collections.Counter()
    for value in tensors.values():
        if isinstance(value, TensorRef):
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
        flat = from_bytes(buf, dtype, st.nbytes // dtype.itemsize, st.source.little_endian)
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
    if isinstance(obj, TensorRef):
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
        or not (isinstance(v, TensorRef) or (isinstance(v, np.ndarray) and not v.dtype.hasobject))
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


def read_torch_zip(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable zip archive ({e}); {REDOWNLOAD_HINT}") from None
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
            raise CorruptCheckpointError(f"{path}: damaged archive record ({e}); {REDOWNLOAD_HINT}") from None
        if byteorder not in ("little", "big"):
            raise CorruptCheckpointError(f"{path}: unknown byteorder record {byteorder!r:.20}")
        source = _ZipSource(archive, prefix, path, byteorder == "little")
        storages: dict[str, StorageRef] = {}

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
                storages[key] = StorageRef(source, key, dtype, 0, nbytes, nbytes)
            return storages[key]

        obj = unpickle(RestrictedUnpickler(io.BytesIO(data), path, persistent_load), path, f"'{pkls[0]}'")
        return _materialize(_select_state_dict(obj, path), path)


def _ascii(value):
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _storage_dtype(storage_type, path: pathlib.Path) -> np.dtype:
    if isinstance(storage_type, TorchToken) and storage_type.kind in ("storage", "dtype"):
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


def read_torch_legacy(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as raw_file:
        f = _BoundedReader(raw_file, size)
        magic = unpickle(RestrictedUnpickler(f, path), path)
        if magic != _LEGACY_MAGIC:
            raise UnknownFormatError(
                f"{path}: a plain Python pickle, not a PyTorch checkpoint (no torch magic number); only "
                "torch.save files and safetensors are read"
            )
        protocol = unpickle(RestrictedUnpickler(f, path), path)
        if protocol != _LEGACY_PROTOCOL:
            raise UnknownFormatError(f"{path}: legacy torch file with unsupported protocol {protocol!r:.40}")
        sys_info = unpickle(RestrictedUnpickler(f, path), path)
        little_endian = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        source = _LegacySource(f, path, little_endian)
        roots: dict[str, tuple[np.dtype, int]] = {}

        def persistent_load(pid):
            if isinstance(pid, tuple) and pid and _ascii(pid[0]) == "module":
                raise UnknownFormatError(
                    f"{path}: the file pickles whole nn.Module classes (torch.save(model)); load it with torch "
                    f"in a trusted environment and save model.state_dict() instead. {RESAVE_HINT}"
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
                return StorageRef(source, root_key, dtype, 0, root_nbytes, root_nbytes)
            try:
                _view_key, view_offset, view_size = view
                begin, length = as_index(view_offset, "view offset") * dtype.itemsize, as_index(view_size, "view size") * dtype.itemsize
            except (TypeError, ValueError):
                raise CorruptCheckpointError(f"{path}: malformed storage view {view!r:.100}") from None
            if begin < 0 or length < 0 or begin + length > root_nbytes:
                raise CorruptCheckpointError(f"{path}: storage view {view!r:.100} lies outside storage {root_key}")
            return StorageRef(source, root_key, dtype, begin, length, root_nbytes)

        obj = unpickle(RestrictedUnpickler(f, path, persistent_load), path)
        keys = unpickle(RestrictedUnpickler(f, path), path, "the storage key list")
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
                raise CorruptCheckpointError(f"{path}: storage {key} is truncated; {REDOWNLOAD_HINT}")
            (numel,) = struct.unpack(order, header)
            if numel * dtype.itemsize != nbytes:
                raise CorruptCheckpointError(
                    f"{path}: storage {key} records {numel} elements, the pickle expects {nbytes // dtype.itemsize}"
                )
            source.offsets[key] = pos + 8
            pos += 8 + nbytes
            if pos > size:
                raise CorruptCheckpointError(f"{path}: storage {key} runs past the end of the file; {REDOWNLOAD_HINT}")
        return _materialize(_select_state_dict(obj, path), path)

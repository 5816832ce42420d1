"""A torch-free safetensors reader and writer that keep bfloat16 and float8.

Why not the `safetensors` package: `safetensors.numpy` (0.4 - 0.8) knows no BF16 / F8 dtypes (its `_TYPES`
table stops at C64), `safe_open(framework="numpy")` and `save_file` go through the same table, while released
Stable Diffusion / Paint-by-Example weights are often bfloat16 and bfloat16 is a supported export dtype. The
reader also validates the header (overlaps, gaps, truncation) with a message naming the file; the writer's
files are byte-identical to `safetensors.numpy.save_file`'s where that one can write them (tests/test_export.py).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct
import sys
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from sketchcomp_jax.weights.errors import (
    CorruptCheckpointError,
    UnknownFormatError,
)
from sketchcomp_jax.weights.read_common import REDOWNLOAD_HINT, as_index, as_int_tuple, from_bytes
from sketchcomp_jax.weights.errors import ExportError

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



def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptCheckpointError(f"{path}: too short ({size} bytes) for a safetensors file; {REDOWNLOAD_HINT}")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path}: the safetensors header claims {header_len} bytes but the file has {size}; {REDOWNLOAD_HINT}"
            )
        if header_len > 100 * 2**20:
            raise CorruptCheckpointError(f"{path}: safetensors header of {header_len} bytes exceeds the 100 MB limit")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({e}); {REDOWNLOAD_HINT}") from None
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
                shape = as_int_tuple(info["shape"], "shape")
                begin, end = (as_index(v, "data offset") for v in info["data_offsets"])
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
                f"{path}: the data section needs {expected} bytes but only {data_len} are present; {REDOWNLOAD_HINT}"
            )
        out: dict[str, np.ndarray] = {}
        for begin, end, name, dtype, shape in entries:
            buf = bytearray(end - begin)
            f.seek(data_start + begin)
            if f.readinto(buf) != len(buf):
                raise CorruptCheckpointError(f"{path}: tensor {name!r} is truncated; {REDOWNLOAD_HINT}")
            out[name] = from_bytes(buf, dtype, len(buf) // dtype.itemsize, True).reshape(shape)
    return {name: out[name] for name in header if name in out}  # header order


# --------------------------------------------------------------------------------------------------
# Writer (no torch). Why not `safetensors.numpy.save_file`: it rejects bfloat16 / float8 arrays (no BF16 in
# its dtype table), and exports in bfloat16 are a supported --dtype.
# --------------------------------------------------------------------------------------------------

_ST_NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.float8_e5m2): "F8_E5M2",
}
# The order of the reference implementation's dtype enum: tensors are laid out by descending dtype, then by
# name, which keeps every tensor aligned to its element size and makes our files byte-identical to
# `safetensors.{numpy,torch}.save_file` output (given the same metadata).
_ST_RANK = {
    name: i
    for i, name in enumerate(
        ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"]
    )
}


def _st_dtype(name: str, array: np.ndarray) -> str:
    try:
        return _ST_NAMES[array.dtype]
    except KeyError:
        raise ExportError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store") from None


def save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Writes `tensors` (name → array) as a safetensors file, without torch.

    Format: 8-byte little-endian header length, a compact JSON header (`__metadata__` first, then
    `{name: {dtype, shape, data_offsets}}`) padded with spaces to a multiple of 8 bytes, then the raw
    little-endian C-order tensor bytes. Tensors are streamed to the file one at a time.
    """
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ExportError(f"invalid tensor name {name!r} for safetensors")
        a = np.asarray(value)
        if a.dtype.byteorder not in "=|":  # non-native byte order: store values, not bytes
            a = a.astype(a.dtype.newbyteorder("="))
        arrays[name] = a
    order = sorted(arrays, key=lambda n: (-_ST_RANK[_st_dtype(n, arrays[n])], n))
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ExportError("safetensors metadata must map str to str")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name in order:
            a = np.ascontiguousarray(arrays[name])
            if a.dtype.itemsize > 1 and sys.byteorder == "big":
                a = a.view(np.dtype(f"u{a.dtype.itemsize}")).byteswap()
            f.write(memoryview(a.reshape(-1).view(np.uint8)))

"""PiDiNet weights: pixel-difference -> vanilla conversion and torch -> Flax mapping.

The released ``table5_pidinet.pth`` holds the *un-converted* pixel-difference kernels (keys prefixed
with ``module.`` because the authors trained under ``DataParallel``). PiDiNet's ``convert_pidinet(sd,
'carv4')`` re-parameterises them into vanilla convolutions; :func:`convert_pidinet_state_dict`
implements the same rules (``carv4``: layer types ``[cd, ad, rd, cv] x 4`` for ``init_block``,
``block1_1 .. block4_4``; only ``init_block.weight`` and the ``block*.conv1.weight`` kernels change):

* ``cv``: unchanged;
* ``cd`` (central difference): ``w[:, :, 1, 1] -= w.sum((2, 3))``;
* ``ad`` (angular difference): ``w_flat - w_flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]`` (clockwise
  neighbour), reshaped back to 3x3;
* ``rd`` (radial difference): the 3x3 kernel becomes a 5x5 kernel (conv padding 2) with
  ``buf[[0, 2, 4, 10, 14, 20, 22, 24]] = w_flat[1:]`` and ``buf[[6, 7, 8, 11, 13, 16, 17, 18]] =
  -w_flat[1:]`` (all other entries 0). Note ``w_flat[1:]`` takes the *flattened* kernel from index 1 on
  (the 8 entries after the top-left one), exactly as the original does.

Unlike the original (whose ``cd`` rule writes into its input), the input arrays are never modified.

:func:`load_pidinet_params` reads a ``.pth`` (torch-free, via :func:`sketchcomp_jax.weights.readers.
read_state_dict`) or ``.safetensors`` file, strips the ``module.`` prefix, converts if needed (an already
converted state dict, recognised by its 5x5 ``rd`` kernels, is used as is), checks the key set and the
shapes, and returns the Flax ``params`` tree of :class:`sketchcomp_jax.models.pidinet.PiDiNet` (OIHW ->
HWIO).
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.models.pidinet import CARV4_PDCS
from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.key_check import key_listing, key_set_problems, shape_mismatches

__all__ = [
    "PidinetCheckpointError",
    "convert_pdc",
    "convert_pidinet_state_dict",
    "expected_pidinet_shapes",
    "is_converted_pidinet_state_dict",
    "load_pidinet_params",
    "pidinet_params_from_state_dict",
    "strip_module_prefix",
]


class PidinetCheckpointError(CheckpointError):
    """The state dict is not a PiDiNet carv4 (+CDCM +CSAM) checkpoint: missing/unexpected keys or shapes."""


_AD_PERM = [3, 0, 1, 6, 4, 2, 7, 8, 5]
_RD_POS = [0, 2, 4, 10, 14, 20, 22, 24]
_RD_NEG = [6, 7, 8, 11, 13, 16, 17, 18]

# torch key of the pixel-difference kernel of each of the 16 carv4 layers, in order.
_PDC_KEYS: tuple[str, ...] = ("init_block.weight",) + tuple(
    f"block{s}_{j}.conv1.weight" for s, n in ((1, 3), (2, 4), (3, 4), (4, 4)) for j in range(1, n + 1)
)


def _torch_order_sum9(flat: np.ndarray) -> np.ndarray:
    """Sum over the last axis (9 taps) in the order PyTorch's CPU float32 ``w.sum(dim=[2, 3])`` uses
    (``x8 + x0``, then ``x1 .. x7`` one by one; measured with torch 2.x on x86-64), so that the converted
    ``cd`` kernels are bit-identical to the original's. The ``cd`` kernels cancel strongly (the tap sum is
    small next to the taps), so another order changes up to ~20 ulp of the centre tap; the value is the
    same up to that rounding."""
    s = flat[..., 8] + flat[..., 0]
    for j in range(1, 8):
        s = s + flat[..., j]
    return s


def convert_pdc(op: str, w: np.ndarray) -> np.ndarray:
    """Converts one (O, I, 3, 3) pixel-difference kernel of type ``op`` into a vanilla kernel (new array)."""
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[2:] != (3, 3):
        raise ValueError(f"pixel-difference kernel must be (O, I, 3, 3), got {w.shape}")
    if op == "cv":
        return w.copy()
    o, i = w.shape[:2]
    flat = w.reshape(o, i, 9)
    if op == "cd":
        out = w.copy()
        out[:, :, 1, 1] = w[:, :, 1, 1] - _torch_order_sum9(flat)
        return out
    if op == "ad":
        return (flat - flat[:, :, _AD_PERM]).reshape(o, i, 3, 3)
    if op == "rd":
        buf = np.zeros((o, i, 25), dtype=w.dtype)
        buf[:, :, _RD_POS] = flat[:, :, 1:]
        buf[:, :, _RD_NEG] = -flat[:, :, 1:]
        return buf.reshape(o, i, 5, 5)
    raise ValueError(f"unknown pixel-difference type {op!r} (expected cv, cd, ad or rd)")


def strip_module_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Removes the ``module.`` prefix (DataParallel) from every key that has it."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}


def expected_pidinet_shapes(
    converted: bool, base: int = 60, dil: int = 24, pdcs: tuple[str, ...] = CARV4_PDCS
) -> dict[str, tuple[int, ...]]:
    """Key -> OIHW shape of the (un)converted ``pidinet --config carv4 --sa --dil`` state dict (no prefix)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def kernel(op: str) -> int:
        return 5 if (converted and op == "rd") else 3

    shapes["init_block.weight"] = (base, 3, kernel(pdcs[0]), kernel(pdcs[0]))
    ch, layer, fuse = base, 1, []
    for s, n in ((1, 3), (2, 4), (3, 4), (4, 4)):
        for j in range(1, n + 1):
            in_ch = ch
            if j == 1 and s > 1:
                if s < 4:
                    ch *= 2
                shapes[f"block{s}_{j}.shortcut.weight"] = (ch, in_ch, 1, 1)
                shapes[f"block{s}_{j}.shortcut.bias"] = (ch,)
            k = kernel(pdcs[layer])
            shapes[f"block{s}_{j}.conv1.weight"] = (in_ch, 1, k, k)
            shapes[f"block{s}_{j}.conv2.weight"] = (ch, in_ch, 1, 1)
            layer += 1
        fuse.append(ch)
    for i, c in enumerate(fuse):
        shapes[f"dilations.{i}.conv1.weight"] = (dil, c, 1, 1)
        shapes[f"dilations.{i}.conv1.bias"] = (dil,)
        for j in range(1, 5):
            shapes[f"dilations.{i}.conv2_{j}.weight"] = (dil, dil, 3, 3)
        shapes[f"attentions.{i}.conv1.weight"] = (4, dil, 1, 1)
        shapes[f"attentions.{i}.conv1.bias"] = (4,)
        shapes[f"attentions.{i}.conv2.weight"] = (1, 4, 3, 3)
        shapes[f"conv_reduces.{i}.conv.weight"] = (1, dil, 1, 1)
        shapes[f"conv_reduces.{i}.conv.bias"] = (1,)
    shapes["classifier.weight"] = (1, 4, 1, 1)
    shapes["classifier.bias"] = (1,)
    return shapes


def _check_keys(sd: Mapping[str, Any], converted: bool, source: str) -> None:
    expected = expected_pidinet_shapes(converted)
    problems = key_set_problems(expected, sd)
    if problems:
        raise PidinetCheckpointError(
            f"{source}: not a PiDiNet carv4 checkpoint (pidinet --config carv4 --sa --dil, e.g. "
            f"table5_pidinet.pth); " + "; ".join(problems)
        )
    bad = shape_mismatches(sd, expected)
    if bad:
        raise PidinetCheckpointError(
            f"{source}: PiDiNet carv4 state dict with wrong tensor shapes ({'converted' if converted else 'unconverted'} "
            f"layout expected): " + key_listing(bad, 8, "; ")
        )


def is_converted_pidinet_state_dict(sd: Mapping[str, Any]) -> bool:
    """True if the (prefix-stripped) carv4 state dict already holds converted kernels (5x5 ``rd`` layers).

    Raises :class:`PidinetCheckpointError` if some ``rd`` kernels are 5x5 and others 3x3 (half-converted).
    """
    sizes = set()
    for key, op in zip(_PDC_KEYS, CARV4_PDCS):
        if op == "rd" and key in sd:
            sizes.add(tuple(np.shape(sd[key])[2:]))
    if len(sizes) > 1:
        raise PidinetCheckpointError(f"PiDiNet state dict mixes converted and unconverted rd kernels: {sorted(sizes)}")
    return sizes == {(5, 5)}


def convert_pidinet_state_dict(sd: Mapping[str, np.ndarray], *, source: str = "state dict") -> dict[str, np.ndarray]:
    """carv4 pixel-difference -> vanilla conversion (PiDiNet's ``convert_pidinet(sd, 'carv4')``).

    Accepts keys with or without the ``module.`` prefix (it is stripped in the result). If the state
    dict is already converted (5x5 ``rd`` kernels) it is returned (as fresh copies) without converting
    again. Never modifies the input arrays. Raises :class:`PidinetCheckpointError` if ``sd`` is not a
    carv4 PiDiNet state dict.
    """
    sd = strip_module_prefix(sd)
    converted = is_converted_pidinet_state_dict(sd)
    _check_keys(sd, converted, source)
    out = {k: np.array(v, copy=True) for k, v in sd.items()}
    if not converted:
        for key, op in zip(_PDC_KEYS, CARV4_PDCS):
            out[key] = convert_pdc(op, np.asarray(sd[key]))
    return out


def _flax_path(torch_key: str) -> tuple[tuple[str, ...], str]:
    """'dilations.0.conv2_1.weight' -> (('dilations_0', 'conv2_1'), 'weight')."""
    key = re.sub(r"^(dilations|attentions|conv_reduces)\.(\d+)\.", r"\1_\2.", torch_key)
    *mods, leaf = key.split(".")
    return tuple(mods), leaf


def pidinet_params_from_state_dict(sd: Mapping[str, np.ndarray], *, source: str = "state dict") -> dict:
    """Prefix-stripping, conversion (if needed) and OIHW -> HWIO mapping: returns the Flax ``params`` tree
    (nested dicts of float32 numpy arrays) for :class:`sketchcomp_jax.models.pidinet.PiDiNet`."""
    conv = convert_pidinet_state_dict(sd, source=source)
    params: dict = {}
    for key, value in conv.items():
        mods, leaf = _flax_path(key)
        value = np.asarray(value, dtype=np.float32)
        if leaf == "weight":
            name, value = "kernel", np.ascontiguousarray(value.transpose(2, 3, 1, 0))
        elif leaf == "bias":
            name = "bias"
        else:  # pragma: no cover - excluded by _check_keys
            raise PidinetCheckpointError(f"{source}: unexpected parameter {key}")
        node = params
        for m in mods:
            node = node.setdefault(m, {})
        node[name] = value
    return params


def load_pidinet_params(path: str | os.PathLike) -> dict:
    """Loads a PiDiNet carv4 checkpoint (``.pth`` / ``.pt`` / ``.ckpt`` or ``.safetensors``, converted or
    not, with or without the ``module.`` prefix) into Flax params for :class:`PiDiNet`.

    The file is read torch-free by :func:`sketchcomp_jax.weights.readers.read_state_dict` (format sniffed
    from the content). Raises ``CheckpointError`` subclasses: the reader's (not found, corrupt, unknown
    format, unsafe pickle, ...) or :class:`PidinetCheckpointError` naming the missing / unexpected keys.
    """
    from sketchcomp_jax.weights.readers import read_state_dict

    sd = read_state_dict(path)
    return pidinet_params_from_state_dict(sd, source=str(path))

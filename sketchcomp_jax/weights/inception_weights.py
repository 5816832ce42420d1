"""FID Inception-V3 weights: PyTorch state dict -> Flax variables of :class:`FIDInceptionV3`.

The checkpoint is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (TensorFlow's 2015-12-05
Inception graph ported to torchvision's module names), or the same tensors re-saved as
``.safetensors``. The file is read torch-free by :func:`sketchcomp_jax.weights.readers.read_state_dict`
(no pickle code runs).

Key map (every ``BasicConv2d`` of the checkpoint, e.g. ``Mixed_5b.branch5x5_2``, maps to the Flax module
of the same path, ``Mixed_5b/branch5x5_2``)::

    <conv>.conv.weight      (O, I, kh, kw)  -> params/<conv>/conv/kernel     (kh, kw, I, O)
    <conv>.bn.weight        (O,)            -> params/<conv>/bn/scale
    <conv>.bn.bias          (O,)            -> params/<conv>/bn/bias
    <conv>.bn.running_mean  (O,)            -> batch_stats/<conv>/bn/mean
    <conv>.bn.running_var   (O,)            -> batch_stats/<conv>/bn/var

Ignored (allowed but not required): ``fc.weight`` / ``fc.bias`` (the 1008-way classifier; FID uses the
pool3 features before it) and ``<conv>.bn.num_batches_tracked`` (a training counter). Every other key
must be present with exactly the expected shape; anything else raises
:class:`InceptionCheckpointError` naming the keys.

The list of ``<conv>`` names and the shapes come from the Flax module itself
(``jax.eval_shape`` of its init), so the map cannot drift from the model.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping

import numpy as np

from sketchcomp_jax.weights.errors import CheckpointError
from sketchcomp_jax.weights.key_check import key_listing, key_set_problems, shape_mismatches

__all__ = [
    "FID_CHECKPOINT_NAME",
    "InceptionCheckpointError",
    "expected_inception_shapes",
    "inception_key_map",
    "inception_variables_from_state_dict",
    "is_ignored_inception_key",
    "load_inception_variables",
]

FID_CHECKPOINT_NAME = "pt_inception-2015-12-05-6726825d.pth"

# torch leaf (after the conv's name) -> (Flax collection, module, variable).
_LEAF_MAP: dict[str, tuple[str, str, str]] = {
    "conv.weight": ("params", "conv", "kernel"),
    "bn.weight": ("params", "bn", "scale"),
    "bn.bias": ("params", "bn", "bias"),
    "bn.running_mean": ("batch_stats", "bn", "mean"),
    "bn.running_var": ("batch_stats", "bn", "var"),
}
_IGNORED = re.compile(r"^(fc\.(weight|bias)|.+\.bn\.num_batches_tracked)$")


class InceptionCheckpointError(CheckpointError):
    """The state dict is not the FID Inception-V3: missing / unexpected keys or wrong shapes."""


def is_ignored_inception_key(key: str) -> bool:
    """True for the checkpoint keys that FID does not use (``fc.*``, ``*.bn.num_batches_tracked``)."""
    return bool(_IGNORED.match(key))


@functools.lru_cache(maxsize=1)
def _flax_shapes() -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
    """(collection, Flax path) -> shape of every variable of FIDInceptionV3 (abstract init, no compute)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from sketchcomp_jax.models.inception import FIDInceptionV3

    # Parameter shapes do not depend on the image size: the smallest valid input keeps tracing cheap.
    abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.float32))
    out = {}
    for collection, tree in abstract.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            out[(collection, tuple(path))] = tuple(leaf.shape)
    return out


def inception_key_map() -> dict[str, tuple[str, tuple[str, ...]]]:
    """torch key -> (Flax collection, Flax path) for every *required* key of the FID checkpoint."""
    inverse = {(coll, module, var): leaf for leaf, (coll, module, var) in _LEAF_MAP.items()}
    out = {}
    for (collection, path) in _flax_shapes():
        *conv_path, module, var = path
        leaf = inverse[(collection, module, var)]
        out[".".join(conv_path) + "." + leaf] = (collection, path)
    return out


def expected_inception_shapes() -> dict[str, tuple[int, ...]]:
    """torch key -> torch shape (conv weights OIHW) of every required key of the FID checkpoint."""
    shapes = _flax_shapes()
    out = {}
    for key, (collection, path) in inception_key_map().items():
        shape = shapes[(collection, path)]
        if len(shape) == 4:  # HWIO -> OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[key] = shape
    return out


def _hint(unexpected: list[str]) -> str:
    if any(k.startswith("AuxLogits.") for k in unexpected):
        return (
            " This looks like torchvision's ImageNet Inception-V3 (inception_v3_google-*.pth); FID needs the "
            f"TF-ported FID weights `{FID_CHECKPOINT_NAME}` (pytorch-fid's FID_WEIGHTS_URL)."
        )
    if any(k.startswith("blocks.") for k in unexpected):
        return (
            " This looks like the state dict of pytorch-fid's InceptionV3 wrapper (blocks.N.M.*); pass the "
            f"original `{FID_CHECKPOINT_NAME}` instead."
        )
    return f" Expected the FID Inception weights `{FID_CHECKPOINT_NAME}` (or the same tensors as .safetensors)."


def _check(sd: Mapping[str, Any], source: str) -> None:
    expected = expected_inception_shapes()
    present = {k for k in sd if not is_ignored_inception_key(k)}
    problems = key_set_problems(expected, present)
    if problems:
        raise InceptionCheckpointError(
            f"{source}: not the FID Inception-V3 checkpoint; " + "; ".join(problems) + "."
            + _hint(sorted(present - set(expected)))
        )
    bad = shape_mismatches(sd, expected)
    if bad:
        raise InceptionCheckpointError(
            f"{source}: FID Inception-V3 state dict with wrong tensor shapes: " + key_listing(bad, 8, "; ") + "."
            + _hint([])
        )
    # kind "V": the ml_dtypes floats (bfloat16, float8) that the reader returns for such re-saves.
    non_float = sorted(k for k in expected if np.asarray(sd[k]).dtype.kind not in "fV")
    if non_float:
        raise InceptionCheckpointError(f"{source}: non-floating-point tensors for {key_listing(non_float)}")


def inception_variables_from_state_dict(sd: Mapping[str, Any], *, source: str = "state dict") -> dict:
    """Checks the key set and shapes and returns ``{'params': ..., 'batch_stats': ...}`` for
    :class:`sketchcomp_jax.models.inception.FIDInceptionV3` (nested dicts of float32 numpy arrays; conv
    kernels OIHW -> HWIO). ``fc.*`` and ``num_batches_tracked`` entries are ignored. Raises
    :class:`InceptionCheckpointError` naming the missing / unexpected / wrongly-shaped keys.
    """
    _check(sd, source)
    variables: dict = {}
    for key, (collection, path) in inception_key_map().items():
        value = np.asarray(sd[key]).astype(np.float32)  # bf16 / fp16 re-saves are upcast
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = np.ascontiguousarray(value)
    return variables


def load_inception_variables(path: str | os.PathLike) -> dict:
    """Loads the FID Inception-V3 weights (``pt_inception-2015-12-05-6726825d.pth`` or a ``.safetensors``
    re-save) into Flax variables ``{'params', 'batch_stats'}`` for :class:`FIDInceptionV3`.

    Raises ``CheckpointError`` subclasses: the reader's (not found, corrupt, unknown format, unsafe
    pickle, ...) or :class:`InceptionCheckpointError` (wrong keys or shapes).
    """
    from sketchcomp_jax.weights.readers import read_state_dict

    return inception_variables_from_state_dict(read_state_dict(path), source=str(path))

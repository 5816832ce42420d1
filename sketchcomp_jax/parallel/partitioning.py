"""Parameter sharding rules: pure data parallel (replicated) or FSDP (ZeRO-3 style).

FSDP rule: a leaf with at least `min_size` elements is split along its largest dimension that the
`fsdp` axis size divides (preferring the last such dimension on ties); smaller leaves (biases, norms)
stay replicated. Optimizer states follow their parameters because they are built with the same
shapes (optax moments mirror the params tree).
"""
from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    if fsdp_size <= 1 or len(shape) == 0 or math.prod(shape) < min_size:
        return P()
    candidates = [i for i, n in enumerate(shape) if n % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def param_shardings(tree: Any, mesh: Mesh, strategy: str = "dp", min_size: int = 2**14) -> Any:
    """A pytree of `NamedSharding` matching `tree` (arrays or ShapeDtypeStructs)."""
    if strategy not in ("dp", "fsdp"):
        raise ValueError(f"unknown sharding strategy {strategy!r}; use 'dp' or 'fsdp'")
    fsdp_size = mesh.shape["fsdp"]
    if strategy == "dp":
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), tree)

"""Parameter sharding rules: replicated (`dp`) or sharded by name (`fsdp`: ZeRO-3 style over the `fsdp` mesh
axis, plus Megatron-style tensor parallelism over the `tensor` axis when it is > 1).

Rules are `(regex, value)` pairs. The regex is matched (`re.search`) against a leaf's '/'-joined parameter path
as in the full params tree, e.g. `unet/input_blocks_1_1/transformer_blocks_0/attn1/to_q/kernel`; the first rule
that matches decides. User rules (config `mesh.rules`) are tried before `DEFAULT_RULES`, whose last rule matches
everything. A value is `"replicated"` or comma-separated terms:

* `fsdp`      split the leaf over the whole fsdp axis, placed automatically (below);
* `fsdp@D`    the same, but dimension D takes as much of the axis as it divides first (negative D counts from
              the last dimension);
* `tensor@D`  split dimension D over the `tensor` axis (left out where the axis is 1 or does not divide D).

Under `fsdp` every leaf with at least `min_size` elements is split over the fsdp axis unless its rule says
`replicated` (a value without an fsdp term still gets automatic fsdp placement); smaller leaves (biases,
norms) stay replicated.

Automatic placement, for any fsdp size N. JAX needs every sharded dimension to be divisible by its number of
shards (0.10 raises `IndivisibleError`), and padding parameters would change their shapes (checkpoints,
converters, exports). So the fsdp axis is seen as the product of its prime factors: a second mesh over the
same devices in the same order (`parameter_mesh`) splits `fsdp` into one sub-axis per prime factor, and a leaf
may spread those sub-axes over several dimensions. If one dimension is divisible by N it takes the whole axis
(the largest such, the later on ties: the rule this module had before, so leaves it sharded keep their
layout); otherwise the dimensions, largest first, each take gcd(size, what is left): (3, 3, 640, 640) at
N=256 → 128 shards on the last dimension × 2 on the one before. A leaf still gets exactly 1/N of its bytes per
device; only when no dimension shares a remaining prime factor with N (never for the SD models at N = 2^k)
is it left partly replicated. Leaves whose spec uses the whole fsdp axis get a `NamedSharding` on the
ordinary mesh; the others one on the parameter mesh (same devices, so jit accepts both together).

Optimizer states follow their parameters (train/step.py `state_shardings_for` maps the optax subtrees that
mirror the trainable tree onto its shardings).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP, TENSOR = "fsdp", "tensor"
SHARDED_AXES = (FSDP, TENSOR)

# Tensor parallelism (only where the mesh's `tensor` axis is > 1): attention q/k/v and the MLP's first layer are
# column-parallel (output features split), the attention output and the MLP's second layer row-parallel (input
# features split), so each transformer block needs one all-reduce for attention and one for the MLP. U-Net
# transformer blocks and the CLIP vision/text towers; the VAE's single-head attention and the 5-layer mapper
# (fused qkv) stay fsdp-only.
TENSOR_RULES: tuple[tuple[str, str], ...] = (
    (r"attn\d+/to_[qkv]/kernel$|layers_\d+/[qkv]_proj/kernel$", "tensor@-1,fsdp"),
    (r"attn\d+/to_out/kernel$|layers_\d+/out_proj/kernel$", "tensor@-2,fsdp"),
    (r"/ff_in/kernel$|layers_\d+/fc1/kernel$", "tensor@-1,fsdp"),
    (r"/ff_out/kernel$|layers_\d+/fc2/kernel$", "tensor@-2,fsdp"),
)
DEFAULT_RULES: tuple[tuple[str, str], ...] = TENSOR_RULES + ((r".*", "fsdp"),)


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: re.Pattern
    replicated: bool
    fsdp_first: int | None  # preferred dimension for the fsdp axis (`fsdp@D`)
    tensor_dim: int | None  # `tensor@D`
    source: tuple[str, str]


def _rule_error(rule, problem: str) -> ValueError:
    return ValueError(f"mesh.rules entry {rule!r}: {problem}; mesh.rules is a tuple of (REGEX, VALUE) pairs with "
                      "VALUE 'replicated' or comma-separated 'fsdp', 'fsdp@DIM', 'tensor@DIM', e.g. "
                      "--config.mesh.rules='((\"to_q/kernel$\", \"tensor@-1,fsdp\"),)'")


def parse_rule(rule: Sequence[str]) -> Rule:
    """One `(regex, value)` pair → `Rule`; a malformed one raises a one-line ValueError naming it."""
    if isinstance(rule, str) or len(rule) != 2 or not all(isinstance(x, str) for x in rule):
        raise _rule_error(rule, "not a pair of strings")
    regex, value = rule
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise _rule_error(rule, f"bad regex ({e})") from None
    terms = [t.strip() for t in value.split(",") if t.strip()]
    if terms == ["replicated"]:
        return Rule(pattern, True, None, None, (regex, value))
    fsdp_first = tensor_dim = None
    if not terms:
        raise _rule_error(rule, "empty value")
    for term in terms:
        axis, _, dim = term.partition("@")
        if axis not in SHARDED_AXES or (dim and not re.fullmatch(r"-?\d+", dim)) or (axis == TENSOR and not dim):
            raise _rule_error(rule, f"unknown term {term!r}")
        if axis == TENSOR:
            tensor_dim = int(dim)
        elif dim:
            fsdp_first = int(dim)
    return Rule(pattern, False, fsdp_first, tensor_dim, (regex, value))


def compile_rules(rules: Iterable[Sequence[str]] | None = None) -> tuple[Rule, ...]:
    """User rules (tried first) followed by `DEFAULT_RULES`."""
    return tuple(parse_rule(r) for r in (*(rules or ()), *DEFAULT_RULES))


def prime_factors(n: int) -> tuple[int, ...]:
    """Ascending prime factors with multiplicity: 12 → (2, 2, 3)."""
    out, p = [], 2
    while n > 1 and p * p <= n:
        while n % p == 0:
            out.append(p)
            n //= p
        p += 1
    if n > 1:
        out.append(n)
    return tuple(out)


def fsdp_subaxes(fsdp_size: int) -> tuple[tuple[str, int], ...]:
    """(name, size) of the parameter mesh's sub-axes of `fsdp`, major first (their product is `fsdp_size`)."""
    factors = prime_factors(fsdp_size)
    if len(factors) <= 1:
        return ((FSDP, fsdp_size),) if fsdp_size > 1 else ()
    return tuple((f"{FSDP}_{i}", p) for i, p in enumerate(factors))


def path_string(path) -> str:
    """A tree path as '/'-joined keys (`unet/out_conv/kernel`)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _dim(rule: Rule, d: int, shape: tuple[int, ...], path: str) -> int:
    if not -len(shape) <= d < len(shape):
        raise _rule_error(rule.source, f"dimension {d} does not exist in {path} of shape {shape}")
    return d % len(shape)


def leaf_layout(path: str, shape: tuple[int, ...], fsdp_size: int, tensor_size: int, rules: Sequence[Rule],
                min_size: int) -> tuple[tuple[str, ...], ...]:
    """Per dimension, the mesh axes it is split over (major first; fsdp as `fsdp_subaxes` names). Pure: needs
    only axis sizes, no devices."""
    none = tuple(() for _ in shape)
    if not shape or math.prod(shape) < min_size:
        return none
    rule = next(r for r in rules if r.pattern.search(path))
    if rule.replicated:
        return none
    axes = [[] for _ in shape]
    local = list(shape)
    if rule.tensor_dim is not None and tensor_size > 1:
        d = _dim(rule, rule.tensor_dim, shape, path)
        if shape[d] % tensor_size == 0:  # tensor major within the dimension: gathering fsdp then leaves each
            axes[d].append(TENSOR)       # tensor rank a contiguous block (a plain all-gather)
            local[d] //= tensor_size
    sub = list(fsdp_subaxes(fsdp_size))
    if sub:
        first = None if rule.fsdp_first is None else _dim(rule, rule.fsdp_first, shape, path)
        order = sorted(range(len(shape)), key=lambda i: (i == first, local[i], i), reverse=True)
        whole = [i for i in order if local[i] % fsdp_size == 0]
        if whole and (first is None or whole[0] == first):  # one dimension takes the whole axis (the previous
            # rule's choice); `fsdp@D` with D not divisible by N spreads from D instead
            axes[whole[0]].extend(name for name, _ in sub)
        else:  # spread the prime sub-axes: each dimension, largest first, takes what it can divide
            for i in order:
                for name, p in list(sub):
                    if local[i] % p == 0:
                        axes[i].append(name)
                        local[i] //= p
                        sub.remove((name, p))
    return tuple(tuple(a) for a in axes)


def fsdp_shards(layout: tuple[tuple[str, ...], ...], fsdp_size: int) -> int:
    """Into how many pieces the fsdp axis splits a leaf with `layout` (N: fully sharded, 1: replicated)."""
    sizes = dict(fsdp_subaxes(fsdp_size))
    return math.prod(sizes[a] for dim in layout for a in dim if a in sizes)


@functools.lru_cache(maxsize=16)
def parameter_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with its fsdp axis split into `fsdp_subaxes` (same devices, same order)."""
    names, sizes = [], []
    for name, size in mesh.shape.items():
        if name == FSDP:
            sub = fsdp_subaxes(size) or ((FSDP, 1),)
            names += [n for n, _ in sub]
            sizes += [s for _, s in sub]
        else:
            names.append(name)
            sizes.append(size)
    return Mesh(np.asarray(mesh.devices).reshape(sizes), tuple(names))


def _sharding(layout, mesh: Mesh, keep_fsdp: bool = True) -> NamedSharding:
    sub = [n for n, _ in fsdp_subaxes(mesh.shape.get(FSDP, 1))]
    dims = [tuple(a for a in axes if keep_fsdp or a not in sub) for axes in layout]
    if all(not (set(d) & set(sub)) or set(sub) <= set(d) for d in dims):  # whole fsdp axis or none: plain mesh
        dims = [tuple(a for a in d if a not in sub) + ((FSDP,) if sub and set(sub) <= set(d) else ()) for d in dims]
        target = mesh
    else:
        target = parameter_mesh(mesh)
    spec = [None if not d else d[0] if len(d) == 1 else d for d in dims]
    while spec and spec[-1] is None:
        spec.pop()
    return NamedSharding(target, P(*spec))


def _check_strategy(strategy: str) -> None:
    if strategy not in ("dp", "fsdp"):
        raise ValueError(f"unknown sharding strategy {strategy!r}; use 'dp' or 'fsdp' (--config.mesh.strategy)")


def param_shardings(tree: Any, mesh: Mesh, strategy: str = "dp", min_size: int = 2**14,
                    rules: Iterable[Sequence[str]] | None = None) -> Any:
    """A pytree of `NamedSharding` matching `tree` (arrays or ShapeDtypeStructs; paths as in the params tree).
    `dp`: everything replicated. `fsdp`: the rules above."""
    _check_strategy(strategy)
    if strategy == "dp":
        return jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()), tree)
    compiled = compile_rules(rules)
    fsdp, tensor = mesh.shape.get(FSDP, 1), mesh.shape.get(TENSOR, 1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _sharding(leaf_layout(path_string(path), tuple(x.shape), fsdp, tensor, compiled, min_size),
                                  mesh), tree)


def gather_constraint(mesh: Mesh, min_size: int = 2**14,
                      rules: Iterable[Sequence[str]] | None = None) -> Callable[[Any], Any]:
    """For the train step with tensor parallelism: `fn(params_subtree)` constrains every leaf to its rule's
    sharding without the fsdp axis (XLA all-gathers fsdp, keeps the tensor split). Paths are those of the params
    tree, so it applies to `trainable` and `frozen` alike. With `tensor` = 1 this is the same as constraining
    everything to replicated."""
    compiled = compile_rules(rules)
    fsdp, tensor = mesh.shape.get(FSDP, 1), mesh.shape.get(TENSOR, 1)

    def constrain(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.lax.with_sharding_constraint(
                x, _sharding(leaf_layout(path_string(path), tuple(x.shape), fsdp, tensor, compiled, min_size),
                             mesh, keep_fsdp=False)), tree)

    return constrain


def replicated_bytes(tree: Any, fsdp_size: int, tensor_size: int = 1, min_size: int = 2**14,
                     rules: Iterable[Sequence[str]] | None = None) -> tuple[int, int, int]:
    """(bytes of leaves not split N ways over the fsdp axis, total bytes, parameter bytes per device) of an
    abstract tree under the fsdp rules, from shapes only (no devices: any N)."""
    compiled = compile_rules(rules)
    replicated = total = per_device = 0
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
        layout = leaf_layout(path_string(path), tuple(x.shape), fsdp_size, tensor_size, compiled, min_size)
        shards = fsdp_shards(layout, fsdp_size)
        total += nbytes
        replicated += nbytes if shards < fsdp_size else 0
        tensor_shards = tensor_size if any(TENSOR in d for d in layout) else 1
        per_device += nbytes // (shards * tensor_shards)
    return replicated, total, per_device

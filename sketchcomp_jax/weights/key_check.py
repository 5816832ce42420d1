"""Pieces of the "does this state dict hold the model we expect" checks: key-set and shape comparisons and
the listings that name the offending keys in the error messages."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def key_listing(items: Sequence[str], limit: int = 12, sep: str = ", ") -> str:
    """`a, b, c, ... (N in all)`: the first `limit` items joined by `sep`, and the count when some are cut."""
    shown = sep.join(items[:limit])
    return shown + (f"{sep}... ({len(items)} in all)" if len(items) > limit else "")


def key_set_problems(expected: Iterable[str], present: Iterable[str], limit: int = 12) -> list[str]:
    """`["missing keys: …", "unexpected keys: …"]` (each sorted, only those that apply); empty when the sets agree."""
    expected, present = set(expected), set(present)
    problems = []
    if missing := sorted(expected - present):
        problems.append(f"missing keys: {key_listing(missing, limit)}")
    if unexpected := sorted(present - expected):
        problems.append(f"unexpected keys: {key_listing(unexpected, limit)}")
    return problems


def shape_mismatches(sd: Mapping[str, Any], expected_shapes: Mapping[str, tuple[int, ...]],
                     prefix: str = "") -> list[str]:
    """`"{prefix}{key}: (got) (expected (want))"` for each expected key present in `sd` with another shape, in
    the order of `expected_shapes`."""
    return [f"{prefix}{k}: {tuple(np.shape(sd[k]))} (expected {shape})"
            for k, shape in expected_shapes.items() if k in sd and tuple(np.shape(sd[k])) != tuple(shape)]

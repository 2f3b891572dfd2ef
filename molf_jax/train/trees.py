"""Splitting a parameter tree into trainable and frozen parts, and joining them back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from molf_jax.routing._labels import path_to_str

__all__ = ["split_tree", "join_trees", "tree_paths", "count_params"]


def split_tree(tree: Mapping, keep: Callable[[str], bool]) -> tuple[dict, dict]:
    """Splits nested dicts by leaf path into (kept, rest); empty branches are dropped.

    Example:
      >>> split_tree({"a": {"x": 1, "y": 2}}, lambda p: p.endswith("x"))
      ({'a': {'x': 1}}, {'a': {'y': 2}})
    """
    kept, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            k, r = split_tree(value, lambda p, key=key: keep(f"{key}/{p}"))
            if k:
                kept[key] = k
            if r:
                rest[key] = r
        elif keep(str(key)):
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def join_trees(a: Mapping, b: Mapping) -> dict:
    """Inverse of `split_tree`: the union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for key, value in b.items():
        if key in out:
            if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
                raise ValueError(f"join_trees: leaf {key!r} is in both trees")
            out[key] = join_trees(out[key], value)
        else:
            out[key] = value
    return out


def tree_paths(tree: Any) -> list[str]:
    """Leaf paths ``"a/b/c"`` in flattening order."""
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))

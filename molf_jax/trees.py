"""Tree utilities every layer above the routing core shares: leaf paths, joining a split tree,
counts.

The path string is the routing labels' (`molf_jax.routing.path_to_str`), so that routing
tables, checkpoints and exports name a leaf the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from molf_jax.routing import path_to_str

__all__ = ["join_trees", "tree_paths", "count_params", "path_to_str"]


def join_trees(a: Mapping, b: Mapping) -> dict:
    """Inverse of `split_trainable`: the union of two nested dicts with disjoint leaves.

    Example:
      >>> join_trees({"a": {"x": 1}}, {"a": {"y": 2}})
      {'a': {'x': 1, 'y': 2}}
    """
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
    """Leaf paths ``"a/b/c"`` in flattening order.

    Example:
      >>> tree_paths({"a": {"b": 1, "c": [2, 3]}})
      ['a/b', 'a/c/0', 'a/c/1']
    """
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def count_params(tree: Any) -> int:
    """Number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
    return int(sum(x.size for x in jax.tree.leaves(tree)))

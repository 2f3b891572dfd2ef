"""Finding an inner Adam-family optimizer's first and second moments, aligned with params.

Adam-family states (``ScaleByAdamState``, ``ScaleByAmsgradState``, ...) hold ``mu`` and ``nu``
trees shaped like the params. Inside ``optax.partition`` / ``optax.masked`` each group's state
holds ``MaskedNode`` where a leaf belongs to another group, so the per-group trees are merged
leaf by leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

__all__ = ["find_moments"]


def _is_adam_state(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "mu") and hasattr(x, "nu")


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def find_moments(state: Any, num_leaves: int) -> tuple[list, list]:
    """Returns (mu_leaves, nu_leaves): lists of length ``num_leaves`` aligned with the params'
    flattened leaves; an entry is None where no Adam state covers that leaf."""
    mus: list = [None] * num_leaves
    nus: list = [None] * num_leaves
    for node in jax.tree.leaves(state, is_leaf=_is_adam_state):
        if not _is_adam_state(node):
            continue
        mu_leaves = jax.tree.leaves(node.mu, is_leaf=_is_masked)
        nu_leaves = jax.tree.leaves(node.nu, is_leaf=_is_masked)
        if len(mu_leaves) != num_leaves or len(nu_leaves) != num_leaves:
            raise ValueError(
                f"molf_route: an Adam state inside the inner optimizer has {len(mu_leaves)} "
                f"moment leaves for {num_leaves} params leaves; the inner optimizer must see the "
                "same tree as molf_route")
        for i, (mu, nu) in enumerate(zip(mu_leaves, nu_leaves)):
            if _is_masked(mu):
                continue
            if mus[i] is not None:
                raise ValueError("molf_route: two Adam states in the inner optimizer cover the "
                                 f"same leaf (index {i}); the moments are ambiguous")
            mus[i], nus[i] = mu, nu
    return mus, nus

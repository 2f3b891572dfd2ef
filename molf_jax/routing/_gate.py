"""`molf_gate`: the card's literal ``optax.chain(molf_gate(...), optax.adamw(...))`` form.

A transform placed *before* a stock optimizer cannot see that optimizer's moments and cannot
touch its output, so it can only gate gradients. This is a different, approximate method
(docs/design.md section 2): it scores experts on an exponential moving average of their mean
squared gradient that it keeps itself, and passes zero gradients for the losers. The adamw that follows
still moves losers by its momentum and weight decay, and their moments decay toward zero
instead of tracking the true gradients. Use `molf_route` for the paper's method.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from molf_jax.routing._route import _check_top_k, _check_top_k_type, expert_sums, mask_updates, top_k_mask
from molf_jax.routing._scores import Score
from molf_jax.routing._table import build_routing_table, flatten_params, is_masked

__all__ = ["MolfGateState", "molf_gate"]

_SQUARED_GRAD = Score(elementwise=lambda mu, nu, g, p: g * g, combine=None, uses_moments=False)


class MolfGateState(NamedTuple):
    """State of `molf_gate`.

    Attributes:
      count: int32 scalar, steps taken.
      grad_sq_ema: float32 [M, E], EMA of each expert's mean squared gradient.
      scores: float32 [M, E], this step's scores (-inf where a module has no such expert).
      winners: bool [M, E], experts whose gradients passed this step.
      win_counts: int32 [M, E], running count of wins.
    """

    count: jax.Array
    grad_sq_ema: jax.Array
    scores: jax.Array
    winners: jax.Array
    win_counts: jax.Array


def molf_gate(labels: Any, *, top_k: int = 1, decay: float = 0.9) -> optax.GradientTransformation:
    """Gates gradients per module to the top-k experts by bias-corrected RMS gradient EMA.

    Args:
      labels: as for `molf_route`.
      top_k: experts whose gradients pass per module and step.
      decay: EMA decay of the per-expert mean squared gradient.

    Example:
      >>> from molf_jax.routing import label_lora_experts
      >>> tx = optax.chain(molf_gate(label_lora_experts), optax.adamw(1e-3))
    """
    _check_top_k_type(top_k)

    def init_fn(params):
        if not jax.tree.leaves(params, is_leaf=is_masked):
            # optax.tree.map_params's leafless placeholder (see molf_route's init).
            return MolfGateState(*(jnp.zeros(()),) * 5)
        table = build_routing_table(labels, params)
        _check_top_k(table, top_k)
        shape = table.valid.shape
        return MolfGateState(
            count=jnp.zeros((), jnp.int32),
            grad_sq_ema=jnp.zeros(shape, jnp.float32),
            scores=jnp.full(shape, -jnp.inf, jnp.float32),
            winners=jnp.zeros(shape, bool),
            win_counts=jnp.zeros(shape, jnp.int32),
        )

    def update_fn(updates, state, params=None):
        del params
        table = build_routing_table(labels, updates)
        grads = flatten_params(updates)
        nothing = [None] * table.num_leaves
        sums = expert_sums(table, _SQUARED_GRAD, nothing, nothing, grads, grads)
        mean_sq = sums / jnp.asarray(np.where(table.valid, table.num_params, 1), jnp.float32)
        ema = decay * state.grad_sq_ema + (1.0 - decay) * mean_sq
        count = optax.safe_increment(state.count)
        corrected = ema / (1.0 - decay ** count.astype(jnp.float32))
        scores = jnp.where(table.valid, jnp.sqrt(corrected), -jnp.inf)
        winners = top_k_mask(scores, table.valid, top_k)
        return mask_updates(table, updates, winners), MolfGateState(
            count=count,
            grad_sq_ema=ema,
            scores=scores,
            winners=winners,
            win_counts=state.win_counts + winners.astype(jnp.int32),
        )

    return optax.GradientTransformation(init_fn, update_fn)

"""Optimizer states laid out like the parameters they follow, for sharded custom loops.

``jax.jit(tx.init)(params)`` returns zeros whose layout nothing ties to the params': XLA puts
them on one device (or replicates them), so every step would gather the whole Adam state.
`state_shardings` asks optax which parts of the state are shaped like the params
(``optax.tree.map_params``) and gives those the params' shardings; `sharded_init` builds the
state straight into them.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from molf_jax.routing._table import is_masked

__all__ = ["sharded_init", "state_shardings"]


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """The sharding of every leaf of ``tx.init(params)``.

    Each tree of the state shaped like the params (Adam's ``mu`` and ``nu``, inside
    ``optax.partition``/``masked`` and `molf_route` too) takes the params' shardings leaf by
    leaf; everything else (step counts, the routing scores and winners, injected
    hyperparameters) is replicated over the params' mesh. A state leaf whose shape differs
    from its param's (e.g. a factored second moment) is replicated too.

    Args:
      tx: any optax transformation (``molf_adamw(...)``, a chain, a partition, ...).
      params: arrays or ``jax.ShapeDtypeStruct`` s carrying ``.sharding`` (e.g. from
        ``jax.device_put(params, shardings)`` or ``jax.eval_shape`` with ``out_shardings``).

    The label functions of any ``optax.partition`` inside ``tx`` must take any tree (write them
    with ``jax.tree_util.tree_map_with_path``): ``optax.tree.map_params`` calls ``init`` on a
    leafless placeholder to find the params-shaped parts of the state.

    Returns:
      A tree like ``jax.eval_shape(tx.init, params)`` holding shardings, for
      ``jax.jit(..., out_shardings=...)`` or an orbax restore.

    Example:
      >>> shardings = state_shardings(tx, params)   # doctest: +SKIP
      >>> step = jax.jit(train_step, out_shardings=(param_shardings, shardings, None))  # doctest: +SKIP
    """
    abstract = jax.eval_shape(tx.init, params)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    replicated = _replicated(jax.tree.leaves(param_shardings))

    def follow(state_leaf, param_sharding, param):
        if is_masked(state_leaf):
            return state_leaf
        same_shape = np.shape(state_leaf) == np.shape(param)
        return param_sharding if same_shape else replicated

    return optax.tree.map_params(tx, follow, abstract, param_shardings, params,
                                 transform_non_params=lambda _: replicated, is_leaf=is_masked)


def sharded_init(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init(params)`` built under ``jit`` straight into `state_shardings` (no state is
    ever whole on one device).

    Example:
      >>> params = jax.device_put(params, param_shardings)   # doctest: +SKIP
      >>> tx = molf_adamw(labels, fft_learning_rate=1e-4, lora_learning_rate=1e-4)  # doctest: +SKIP
      >>> opt_state = sharded_init(tx, params)   # doctest: +SKIP
    """
    return jax.jit(tx.init, out_shardings=state_shardings(tx, params))(params)


def _replicated(shardings) -> jax.sharding.Sharding:
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    if shardings:
        return shardings[0]
    raise ValueError("state_shardings: params has no leaves")

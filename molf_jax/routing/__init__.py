"""MoLF routing: an optax transform that routes each module's update among its experts.

The transform (`molf_route`) wraps an Adam-family optimizer; `molf_adamw` is the paper's recipe
in one call; `molf_gate` is the approximate gradient-gating form that sits before a stock
optimizer in an ``optax.chain``.
"""

# Labels: which leaves belong to which expert of which module.
from molf_jax.routing._labels import (ExpertLabel, expert_index, expert_key, label_lora_experts,
                                      labels_from_paths, path_to_str)

# The static modules x experts table (row names for logging).
from molf_jax.routing._table import RoutingTable, build_routing_table as routing_table

# Scores.
from molf_jax.routing._scores import SCORE_EPS, ExpertInfo, Score, epd, pfn, resolve_score

# Transforms.
from molf_jax.routing._route import MolfRouteState, molf_route
from molf_jax.routing._recipes import NO_DECAY_LEAVES, OPTIMIZER_GROUPS, molf_adamw, param_groups
from molf_jax.routing._gate import MolfGateState, molf_gate

# Sharded custom loops: the optimizer state laid out like the params.
from molf_jax.routing._sharding import sharded_init, state_shardings

__all__ = [
    "NO_DECAY_LEAVES",
    "OPTIMIZER_GROUPS",
    "ExpertInfo",
    "ExpertLabel",
    "MolfGateState",
    "MolfRouteState",
    "RoutingTable",
    "SCORE_EPS",
    "Score",
    "epd",
    "expert_index",
    "expert_key",
    "label_lora_experts",
    "labels_from_paths",
    "molf_adamw",
    "molf_gate",
    "molf_route",
    "param_groups",
    "path_to_str",
    "pfn",
    "resolve_score",
    "routing_table",
    "sharded_init",
    "state_shardings",
]

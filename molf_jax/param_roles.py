"""Every leaf's role in training, computed once per run beside `add_lora_experts`.

A role says whether a leaf trains, which expert of which routed module it belongs to, and which
AdamW group (learning rate and weight decay) updates it. The training step, the optimizer, the
routing log and the exports all read the same role tree, so no code parses paths to decide
these again.

Example:
  >>> import numpy as np
  >>> params = {"q_proj": {"kernel": np.zeros((4, 4)),
  ...                      "lora_1": {"a": np.zeros((4, 2)), "b": np.zeros((2, 4))}},
  ...           "norm": {"scale": np.ones(4)}}
  >>> roles = param_roles(params, train_base=False, train_others=True)
  >>> roles["q_proj"]["kernel"].trainable, roles["norm"]["scale"].group
  (False, 'fft_no_decay')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from molf_jax.adalora import ADALORA_KEY
from molf_jax.lora import expert_index
from molf_jax.routing import (NO_DECAY_LEAVES, OPTIMIZER_GROUPS, ExpertLabel, label_lora_experts,
                              param_groups)

__all__ = ["ParamRole", "expert_labels", "optimizer_groups", "param_roles", "split_trainable",
           "trainable_mask"]

FFT, FFT_NO_DECAY, LORA = OPTIMIZER_GROUPS


@dataclasses.dataclass(frozen=True)
class ParamRole:
    """What one leaf is for.

    Attributes:
      trainable: the leaf gets gradients and optimizer state.
      expert: its routed module and expert (`ExpertLabel`) when it trains and is routed; None
        otherwise (frozen, or trained by plain AdamW).
      group: its AdamW group: ``'lora'`` (an adapter's leaf, a LoRA expert's or an AdaLoRA
        triplet's: LoRA rate and decay), ``'fft'`` (FFT rate and decay) or
        ``'fft_no_decay'`` (biases and norm scales).
    """

    trainable: bool
    expert: ExpertLabel | None
    group: str


def param_roles(params: Mapping, *, train_base: bool, train_others: bool,
                no_decay: tuple[str, ...] = NO_DECAY_LEAVES) -> dict:
    """The role of every leaf of an adapter-injected parameter tree.

    Args:
      params: nested dicts of arrays, with ``lora_<i>`` experts (or an AdaLoRA triplet) beside
        the targeted kernels; adapter leaves always train.
      train_base: the targeted linears' kernels and biases train (their FFT expert; MoLF).
      train_others: the leaves outside targeted linears train (embeddings, norms, other
        linears).
      no_decay: names of the leaves that take no weight decay.

    Returns:
      A tree like ``params`` holding a `ParamRole` per leaf.
    """
    trains = _trainable(params, train_base, train_others)
    # Routed experts are formed by the leaves that train (a frozen kernel is no expert); the
    # AdamW group of a leaf does not depend on whether it trains.
    labels = label_lora_experts(_split(params, trains)[0])
    groups = param_groups(params, label_lora_experts(params), no_decay)
    adapters = _adapter_leaves(params)

    def role(path, leaf_trains, group, adapter):
        label = _lookup(labels, path) if leaf_trains else None
        # AdaLoRA's factors carry no LoRA expert label but take the adapters' group.
        return ParamRole(trainable=leaf_trains, expert=label, group=LORA if adapter else group)

    return jax.tree_util.tree_map_with_path(role, trains, groups, adapters)


def split_trainable(tree: Mapping, roles: Mapping) -> tuple[dict, dict]:
    """``(trainable, frozen)``: the leaves of ``tree`` (shaped like ``roles``) that train, and
    the rest; empty branches are dropped. Undo with ``molf_jax.train.join_trees``.

    Example:
      >>> params = {"q": {"kernel": 1, "lora_1": {"a": 2, "b": 3}}}
      >>> split_trainable(params, param_roles(params, train_base=False, train_others=False))
      ({'q': {'lora_1': {'a': 2, 'b': 3}}}, {'q': {'kernel': 1}})
    """
    return _split(tree, trainable_mask(roles))


def trainable_mask(roles: Any) -> Any:
    """A tree of bools: which leaves train."""
    return jax.tree.map(lambda role: role.trainable, roles, is_leaf=_is_role)


def expert_labels(roles: Any) -> Any:
    """The routing labels of the trainable leaves (the tree the optimizer sees)."""
    return split_trainable(jax.tree.map(lambda role: role.expert, roles, is_leaf=_is_role),
                           roles)[0]


def optimizer_groups(roles: Any) -> Any:
    """The AdamW group of each trainable leaf, for ``optax.partition`` / `molf_adamw`."""
    return split_trainable(jax.tree.map(lambda role: role.group, roles, is_leaf=_is_role),
                           roles)[0]


def _is_role(x) -> bool:
    return isinstance(x, ParamRole)


def _is_adapter(key) -> bool:
    """Whether ``key`` holds an adapter beside a kernel: a LoRA expert or an AdaLoRA triplet."""
    return expert_index(key) is not None or key == ADALORA_KEY


def _trainable(node: Mapping, train_base: bool, train_others: bool) -> dict:
    """A bool per leaf: adapter leaves train; a targeted linear's own leaves (kernel, bias)
    train with ``train_base``; every other leaf with ``train_others``."""
    target = any(_is_adapter(key) for key in node)
    out = {}
    for key, value in node.items():
        if _is_adapter(key):
            out[key] = jax.tree.map(lambda _: True, value)
        elif isinstance(value, Mapping):
            out[key] = _trainable(value, train_base, train_others)
        else:
            out[key] = train_base if target else train_others
    return out


def _adapter_leaves(node: Mapping, inside: bool = False) -> dict:
    return {key: _adapter_leaves(value, inside or _is_adapter(key))
            if isinstance(value, Mapping) else inside or _is_adapter(key)
            for key, value in node.items()}


def _split(tree: Mapping, mask: Mapping) -> tuple[dict, dict]:
    kept, rest = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            k, r = _split(value, mask[key])
            if k:
                kept[key] = k
            if r:
                rest[key] = r
        elif mask[key]:
            kept[key] = value
        else:
            rest[key] = value
    return kept, rest


def _lookup(tree, path):
    for key in path:
        tree = tree[getattr(key, "key", key)]
    return tree

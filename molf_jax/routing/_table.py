"""The static routing table: modules x experts, built once per tree from labels and shapes.

Everything here is NumPy and Python, computed at trace time; the jitted step only sees the
resulting index arrays, so routing costs one scatter and one gather per step whatever the
number of modules.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
import optax

from molf_jax.routing._labels import ExpertLabel, path_to_str

__all__ = ["RoutingTable", "RoutedLeaf", "build_routing_table", "flatten_labels",
           "flatten_params", "is_masked"]


def is_masked(x) -> bool:
    """Whether ``x`` is the ``optax.MaskedNode`` that ``optax.partition``/``masked`` put in place
    of the leaves another transform owns."""
    return isinstance(x, optax.MaskedNode)


def flatten_params(tree: Any) -> list:
    """The leaves of a params, updates or moments tree, each ``MaskedNode`` counted as one.

    Inside ``optax.partition``/``masked`` the routed transform sees its part of the tree with
    ``MaskedNode`` where a leaf belongs to another part; counting those keeps the leaf indices
    of the routing table the same in every tree the step reads (params, grads, Adam moments).
    """
    return jax.tree.leaves(tree, is_leaf=is_masked)


@dataclasses.dataclass(frozen=True)
class RoutedLeaf:
    """Where one routed leaf's statistics go in the [modules, experts] table."""

    leaf_index: int  # position among the params' flattened leaves
    path: str
    expert: int
    first_row: int  # module row of slice 0
    num_rows: int  # 1, or the layer count of a stacked leaf
    stacked: bool


@dataclasses.dataclass(frozen=True)
class RoutingTable:
    """Static description of the routed modules of one parameter tree.

    Attributes:
      module_names: one name per module row (stacked modules contribute one row per layer).
      valid: bool [M, E]; ``valid[m, e]`` is True when module m has expert e.
      num_params: int64 [M, E]; parameter count of each expert (per layer slice).
      leaves: the routed leaves in flattened order.
      num_leaves: number of leaves of the params tree.
      row_labels: the label module name of each row (stacked modules repeat it per layer).
    """

    module_names: tuple[str, ...]
    valid: np.ndarray
    num_params: np.ndarray
    leaves: tuple[RoutedLeaf, ...]
    num_leaves: int
    row_labels: tuple[str, ...]

    @property
    def num_modules(self) -> int:
        return len(self.module_names)

    @property
    def num_experts(self) -> int:
        return self.valid.shape[1]

    def expert_counts(self) -> np.ndarray:
        """Number of experts of each module, [M]."""
        return self.valid.sum(axis=1)

    def scatter_positions(self) -> np.ndarray:
        """Flat index ``row * E + expert`` for every row of every routed leaf, concatenated."""
        e = self.num_experts
        return np.concatenate(
            [(leaf.first_row + np.arange(leaf.num_rows)) * e + leaf.expert for leaf in self.leaves]
        ) if self.leaves else np.zeros((0,), np.int32)


def _is_label_leaf(x) -> bool:
    return x is None or isinstance(x, ExpertLabel)


def flatten_labels(labels: Any, params: Any) -> list[ExpertLabel | None]:
    """Flattens a label tree (or a callable ``params -> labels``) against the params.

    Leaves that ``optax.partition`` or ``optax.masked`` have masked out (``MaskedNode``) get
    None whatever their label: another transform owns them, so a label tree written for the
    whole model works inside a partition that freezes part of it. Paths are compared as
    `path_to_str` writes them, so a label tree need not share the params' container types
    (plain dicts label an NNX ``State``).

    Returns:
      One entry per leaf of ``flatten_params(params)``.

    Raises:
      ValueError: when the label tree does not have the structure of the params, naming the
        paths that differ, or when a leaf holds something other than an ExpertLabel or None.
    """
    if labels is None:
        raise ValueError(_NO_LABELS)
    if callable(labels) and not isinstance(labels, (dict, list, tuple)):
        labels = labels(params)
    label_paths, label_leaves = _paths_and_leaves(
        labels, lambda x: _is_label_leaf(x) or is_masked(x))
    param_paths, param_leaves = _paths_and_leaves(params, is_masked)
    if label_paths != param_paths:
        if label_paths == [""] and param_paths != [""]:
            raise ValueError(_NO_LABELS)
        missing = sorted(set(param_paths) - set(label_paths))[:5]
        extra = sorted(set(label_paths) - set(param_paths))[:5]
        raise ValueError(
            "molf_route: the label tree does not match the params tree. "
            f"Params leaves without a label: {missing or 'none'}; labels without a param leaf: "
            f"{extra or 'none'}. Give every param leaf an ExpertLabel or None."
        )
    out = []
    for path, label, leaf in zip(label_paths, label_leaves, param_leaves):
        if is_masked(leaf):
            out.append(None)
        elif _is_label_leaf(label):
            out.append(label)
        else:
            raise ValueError(f"molf_route: label of {path!r} is {label!r}; expected an "
                             "ExpertLabel or None")
    return out


# A label tree with a single label for a whole tree is what optax.inject_hyperparams makes of
# a label function: it takes any callable for a schedule and calls it with the step count.
_NO_LABELS = (
    "molf_route: labels is None or one label for the whole tree; under "
    "optax.inject_hyperparams a label function is taken for a schedule and called with the "
    "step count: pass the label tree (label_lora_experts(params)) or name the argument in "
    "static_args")


def _paths_and_leaves(tree, is_leaf):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [path_to_str(p) for p, _ in flat], [x for _, x in flat]


def build_routing_table(labels: Any, params: Any) -> RoutingTable:
    """Validates labels against params and lays the modules out as table rows.

    Raises:
      ValueError: on a mismatched label tree, a module whose expert indices have a gap (an
        expert with no leaves), leaves of one expert with different dtypes or layer counts, a
        stacked leaf without a leading axis, or LoRA factors whose ranks disagree.
    """
    label_leaves = flatten_labels(labels, params)
    param_flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]

    modules: dict[str, dict[int, list[tuple[int, str, Any]]]] = {}
    stacked_of: dict[str, bool] = {}
    for index, ((path, leaf), label) in enumerate(zip(param_flat, label_leaves)):
        if label is None:
            continue
        if stacked_of.setdefault(label.module, label.stacked) != label.stacked:
            raise ValueError(f"molf_route: module {label.module!r} mixes stacked and unstacked "
                             "labels")
        modules.setdefault(label.module, {}).setdefault(label.expert, []).append(
            (index, path_to_str(path), leaf))

    if not modules:
        raise ValueError("molf_route: no leaf carries an ExpertLabel, so there is nothing to "
                         "route; use the inner optimizer alone")

    num_experts = 1 + max(max(experts) for experts in modules.values())
    names, row_labels, valid_rows, count_rows, leaves = [], [], [], [], []
    for module, experts in modules.items():
        indices = sorted(experts)
        first = indices[0]
        if first not in (0, 1) or indices != list(range(first, first + len(indices))):
            gap = next(i for i in range(1, indices[-1] + 1) if i not in experts)
            raise ValueError(f"molf_route: module {module!r} has experts {indices}: expert "
                             f"{gap} has no leaves (experts are 0..E, or 1..E without a base)")
        stacked = stacked_of[module]
        layers = _layer_count(module, experts, stacked)
        for expert, members in experts.items():
            _check_expert(module, expert, members, stacked)
        row = len(names)
        valid = np.zeros(num_experts, bool)
        counts = np.zeros(num_experts, np.int64)
        for expert, members in experts.items():
            valid[expert] = True
            counts[expert] = sum(
                int(np.prod(np.shape(leaf)[1:] if stacked else np.shape(leaf)))
                for _, _, leaf in members)
            for index, path, _ in members:
                leaves.append(RoutedLeaf(index, path, expert, row, layers, stacked))
        for layer in range(layers):
            names.append(_row_name(module, layer) if stacked else module)
            row_labels.append(module)
            valid_rows.append(valid)
            count_rows.append(counts)

    leaves.sort(key=lambda leaf: leaf.leaf_index)
    return RoutingTable(
        module_names=tuple(names),
        valid=np.stack(valid_rows),
        num_params=np.stack(count_rows),
        leaves=tuple(leaves),
        num_leaves=len(param_flat),
        row_labels=tuple(row_labels),
    )


def _row_name(module: str, layer: int) -> str:
    return module.replace("*", str(layer), 1) if "*" in module else f"{module}[{layer}]"


def _layer_count(module, experts, stacked) -> int:
    if not stacked:
        return 1
    sizes = set()
    for members in experts.values():
        for _, path, leaf in members:
            if np.ndim(leaf) < 1:
                raise ValueError(f"molf_route: {path!r} is labelled stacked but is a scalar")
            sizes.add(np.shape(leaf)[0])
    if len(sizes) != 1:
        raise ValueError(f"molf_route: stacked module {module!r} has leaves with different "
                         f"layer counts {sorted(sizes)}")
    return sizes.pop()


def _check_expert(module, expert, members, stacked):
    dtypes = {np.dtype(leaf.dtype) for _, _, leaf in members}
    if len(dtypes) > 1:
        detail = ", ".join(f"{path}: {np.dtype(leaf.dtype)}" for _, path, leaf in members)
        raise ValueError(f"molf_route: expert {expert} of module {module!r} mixes dtypes "
                         f"({detail}); cast its leaves to one dtype")
    by_name = {path.rsplit("/", 1)[-1]: (path, leaf) for _, path, leaf in members}
    if "a" in by_name and "b" in by_name:
        (path_a, a), (path_b, b) = by_name["a"], by_name["b"]
        if np.ndim(a) < 2 or np.ndim(b) < 2 or np.shape(a)[-1] != np.shape(b)[-2]:
            raise ValueError(f"molf_route: LoRA factors of expert {expert} of module {module!r} "
                             f"disagree on rank: {path_a} {np.shape(a)} vs {path_b} "
                             f"{np.shape(b)}")
    if "kernel" in by_name and "bias" in by_name:
        (path_k, k), (path_b, b) = by_name["kernel"], by_name["bias"]
        if np.ndim(b) < 1 or np.shape(k)[-1] != np.shape(b)[-1]:
            raise ValueError(f"molf_route: expert 0 of module {module!r}: bias {path_b} "
                             f"{np.shape(b)} does not fit kernel {path_k} {np.shape(k)}")

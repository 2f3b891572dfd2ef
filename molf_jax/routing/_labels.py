"""Expert labels: which leaves of a parameter pytree belong to which expert of which module.

A routed module (one target linear in the paper) owns several experts. Expert 0 is the full
fine-tuning expert (the base kernel and its bias); experts 1..E are LoRA pairs. MoLF-Efficient
modules have no expert 0. Every leaf of a parameter tree carries either an `ExpertLabel` or
`None` (not routed: it trains with the inner optimizer as usual).

The label function reads two conventions of a parameter tree, defined here because the routing
core imports nothing else of molf_jax (`molf_jax.lora` and `molf_jax.trees` take them from
here): our LoRA expert ``i`` is the dict ``lora_<i>`` beside its module's kernel (the label
function also reads other libraries' layouts, below), and a leaf's path is its keys joined by
``/``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ["ExpertLabel", "expert_index", "expert_key", "label_lora_experts", "labels_from_paths",
           "path_to_str"]

def expert_key(index: int) -> str:
    """The key of LoRA expert ``index`` (from 1) beside a kernel: ``expert_key(2) == "lora_2"``."""
    return f"lora_{index}"


def expert_index(key: Any) -> int | None:
    """The expert number of a ``lora_<i>`` key, or None for any other key.

    Example:
      >>> expert_index("lora_2"), expert_index("kernel")
      (2, None)
    """
    match = _NUMBERED.match(str(key))
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class ExpertLabel:
    """Marks a leaf as part of expert `expert` of routed module `module`.

    Attributes:
      module: name of the routed module, e.g. ``"layers/3/self_attn/q_proj"``. All leaves with
        the same name form one module.
      expert: 0 for the full-fine-tuning expert (base kernel and bias), 1..E for LoRA experts.
      stacked: the leaf's leading axis is a layer index (scanned models); each slice along it is
        routed as its own module. Slice ``l`` of module ``"layers/*/mlp/up_proj"`` is reported as
        ``"layers/l/mlp/up_proj"`` (the first ``*`` is replaced by the index; a name without ``*``
        gets ``"[l]"`` appended).
    """

    module: str
    expert: int
    stacked: bool = False

    def __post_init__(self):
        if not isinstance(self.expert, int) or self.expert < 0:
            raise ValueError(f"ExpertLabel.expert must be an int >= 0, got {self.expert!r} "
                             f"for module {self.module!r}")


def path_to_str(path) -> str:
    """Joins a JAX key path into ``"a/b/0/c"``.

    A trailing ``.value`` attribute is dropped: Flax NNX variables (``nnx.Param``) flatten
    through it, so ``nnx.state(model)`` and its pure arrays (what ``nnx.Optimizer`` hands to
    ``init`` and to ``update``) give the same names, and names like ``.../bias`` stay last.

    Example:
      >>> from jax.tree_util import DictKey, GetAttrKey
      >>> path_to_str((DictKey("fc"), DictKey("bias"), GetAttrKey("value")))
      'fc/bias'
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def labels_from_paths(params: Any, label_fn: Callable[[str, jax.Array], ExpertLabel | None]) -> Any:
    """Builds a label tree by calling ``label_fn(path_string, leaf)`` on every leaf.

    This is the documented way to label any pytree by hand.

    Example:
      >>> import numpy as np
      >>> params = {"w": {"kernel": np.zeros((4, 3)), "lora_1": {"a": np.zeros((4, 2)),
      ...           "b": np.zeros((2, 3))}}, "norm": np.ones(3)}
      >>> def label(path, leaf):
      ...     if path.startswith("w/lora_1"):
      ...         return ExpertLabel("w", 1)
      ...     return ExpertLabel("w", 0) if path.startswith("w/") else None
      >>> labels = labels_from_paths(params, label)
    """
    return jax.tree_util.tree_map_with_path(lambda p, x: label_fn(path_to_str(p), x), params)


# Where a routed module's experts sit among its children, in the layouts people write:
#   numbered (ours, and any multi-expert layout): lora_<i>/... is expert i, from 1;
#   one pair beside the base (nnx.LoRA, peft): lora_a + lora_b, or lora_A + lora_B, is expert 1;
#   nnx.LoRALinear: a `lora` child holding such a pair is expert 1.
# The base (expert 0) is the `kernel` and `bias` beside them, or those of a `base_module`
# (nnx.LoRA) or `base_layer` (peft) child.
_NUMBERED = re.compile(r"^lora_(\d+)$")
_PAIRS = (("lora_a", "lora_b"), ("lora_A", "lora_B"))
_PAIR_CHILD = "lora"
_BASE_KEYS = ("kernel", "bias")
_BASE_CHILDREN = ("base_module", "base_layer")


def _has_pair(node) -> bool:
    return isinstance(node, Mapping) and any(a in node and b in node for a, b in _PAIRS)


def _expert_children(node: Mapping, path: tuple[str, ...]) -> dict[Any, int]:
    """The children of ``node`` that are LoRA experts, with their expert numbers."""
    found: dict[Any, int] = {}
    for key in node:
        match = _NUMBERED.match(str(key))
        if match:
            found[key] = int(match.group(1))
    pairs = [key for a, b in _PAIRS if a in node and b in node for key in (a, b)]
    if _PAIR_CHILD in node and _has_pair(node[_PAIR_CHILD]):
        pairs.append(_PAIR_CHILD)
    if pairs and 1 in found.values():
        raise ValueError(f"{'/'.join(path)}: both {sorted(map(str, pairs))} and lora_1 claim "
                         "LoRA expert 1; use one layout per module")
    found.update(dict.fromkeys(pairs, 1))
    for key, expert in found.items():
        if expert < 1:
            raise ValueError(f"{'/'.join(path + (str(key),))}: LoRA experts are numbered from 1")
    return found


def _default_is_stacked(module_path: tuple[str, ...]) -> bool:
    # Our scanned models keep `layers/<name>` with no integer level; unscanned ones have
    # `layers/<i>/<name>`.
    if "layers" not in module_path:
        return False
    i = module_path.index("layers")
    return i + 1 < len(module_path) and not module_path[i + 1].isdigit()


def label_lora_experts(
    params: Mapping[str, Any],
    *,
    is_stacked: Callable[[tuple[str, ...]], bool] = _default_is_stacked,
) -> Any:
    """Derives expert labels from the paths of a LoRA-injected parameter tree.

    A routed module is any mapping (a dict, a Flax ``FrozenDict`` or an NNX ``State``) whose
    children name LoRA experts, in any of these layouts:

    * ``lora_<i>/...``: expert ``i`` (numbered from 1; ours, ``molf_jax.lora``, and any module
      with several experts, e.g. ``lora_1`` and ``lora_2`` each an ``nnx.LoRA``);
    * ``lora_a`` and ``lora_b`` (``nnx.LoRA``), or ``lora_A`` and ``lora_B`` (peft's names):
      expert 1;
    * a ``lora`` child holding such a pair (``nnx.LoRALinear``): expert 1.

    Its ``kernel`` and ``bias`` (when present in the tree, i.e. trainable), or those of a
    ``base_module`` (``nnx.LoRA``) or ``base_layer`` (peft) child, form expert 0; every leaf of
    an expert's child forms that expert. Other leaves get ``None``. With a frozen base
    (MoLF-Efficient) pass the trainable tree without the kernels, or freeze them with
    ``optax.partition``, and the modules come out LoRA-only.

    Args:
      params: nested mappings of arrays (flax ``params``, ``nnx.state(model, nnx.Param)``).
      is_stacked: tells from a module path whether its leaves carry a leading layer axis. The
        default recognises scanned models: ``layers/<name>`` without an integer level.

    Returns:
      A tree of the same structure holding `ExpertLabel` or ``None``.

    Raises:
      ValueError: a module names expert 1 twice (``lora_1`` beside a pair), or an expert 0.

    Example:
      >>> import numpy as np
      >>> labels = label_lora_experts({"q_proj": {"kernel": np.zeros((4, 4)),
      ...     "lora_1": {"a": np.zeros((4, 2)), "b": np.zeros((2, 4))}}})
      >>> labels["q_proj"]["lora_1"]["a"]
      ExpertLabel(module='q_proj', expert=1, stacked=False)
      >>> label_lora_experts({"fc": {"base_module": {"kernel": np.zeros((4, 4))},
      ...     "lora_a": np.zeros((4, 2)), "lora_b": np.zeros((2, 4))}})["fc"]["lora_b"].expert
      1
    """

    def visit(node, path):
        if not isinstance(node, Mapping):
            return None
        experts = _expert_children(node, path)
        if not experts:
            return {k: visit(v, path + (str(k),)) for k, v in node.items()}
        stacked = bool(is_stacked(path))
        name = _insert_layer_wildcard(path) if stacked else "/".join(path)

        def fill(tree, label):
            return jax.tree.map(lambda _: label, tree)

        out = {}
        for k, v in node.items():
            if k in experts:
                out[k] = fill(v, ExpertLabel(name, experts[k], stacked))
            elif k in _BASE_KEYS:
                out[k] = fill(v, ExpertLabel(name, 0, stacked))
            elif k in _BASE_CHILDREN and isinstance(v, Mapping):
                out[k] = {kk: fill(vv, ExpertLabel(name, 0, stacked) if kk in _BASE_KEYS
                                   else None) for kk, vv in v.items()}
            else:
                out[k] = fill(v, None)
        return out

    return visit(params, ())


def _insert_layer_wildcard(path: tuple[str, ...]) -> str:
    if "layers" in path:
        i = path.index("layers")
        return "/".join(path[: i + 1] + ("*",) + path[i + 1 :])
    return "/".join(path)

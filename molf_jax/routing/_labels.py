"""Expert labels: which leaves of a parameter pytree belong to which expert of which module.

A routed module (one target linear in the paper) owns several experts. Expert 0 is the full
fine-tuning expert (the base kernel and its bias); experts 1..E are LoRA pairs. MoLF-Efficient
modules have no expert 0. Every leaf of a parameter tree carries either an `ExpertLabel` or
`None` (not routed: it trains with the inner optimizer as usual).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from molf_jax.lora import expert_index

__all__ = ["ExpertLabel", "label_lora_experts", "labels_from_paths", "path_to_str"]


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
    """Joins a JAX key path into ``"a/b/0/c"``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


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


_BASE_KEYS = ("kernel", "bias")


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

    A routed module is any dict that holds ``lora_<i>`` sub-dicts. Its ``kernel`` and ``bias``
    (when present in the tree, i.e. trainable) form expert 0; every leaf under ``lora_<i>`` forms
    expert ``i``. Other leaves get ``None``. With a frozen base (MoLF-Efficient) pass the trainable
    tree without the kernels and the modules come out LoRA-only.

    Args:
      params: nested dicts of arrays (flax ``params``).
      is_stacked: tells from a module path whether its leaves carry a leading layer axis. The
        default recognises scanned models: ``layers/<name>`` without an integer level.

    Returns:
      A tree of the same structure holding `ExpertLabel` or ``None``.

    Example:
      >>> import numpy as np
      >>> labels = label_lora_experts({"q_proj": {"kernel": np.zeros((4, 4)),
      ...     "lora_1": {"a": np.zeros((4, 2)), "b": np.zeros((2, 4))}}})
      >>> labels["q_proj"]["lora_1"]["a"]
      ExpertLabel(module='q_proj', expert=1, stacked=False)
    """

    def visit(node, path):
        if not isinstance(node, Mapping):
            return None
        lora_keys = [k for k in node if expert_index(k) is not None]
        if not lora_keys:
            return {k: visit(v, path + (str(k),)) for k, v in node.items()}
        stacked = bool(is_stacked(path))
        name = _insert_layer_wildcard(path) if stacked else "/".join(path)
        out = {}
        for k, v in node.items():
            expert = expert_index(k)
            if expert is not None:
                if expert < 1:
                    raise ValueError(f"{'/'.join(path + (k,))}: LoRA experts are numbered from 1")
                label = ExpertLabel(name, expert, stacked)
            elif k in _BASE_KEYS:
                label = ExpertLabel(name, 0, stacked)
            else:
                label = None
            out[k] = jax.tree.map(lambda _: label, v)
        return out

    return visit(params, ())


def _insert_layer_wildcard(path: tuple[str, ...]) -> str:
    if "layers" in path:
        i = path.index("layers")
        return "/".join(path[: i + 1] + ("*",) + path[i + 1 :])
    return "/".join(path)

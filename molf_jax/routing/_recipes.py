"""`molf_adamw`: the paper's optimizer recipe in one call.

FFT leaves (base kernels, embeddings, unrouted linears) use the FFT learning rate and weight
decay, LoRA leaves the LoRA ones, and biases and norm scales get no weight decay; the routing
reads the same learning rates, so EPD always sees each expert's real step size. Every argument
but the labels may be injected: ``optax.inject_hyperparams(molf_adamw)(labels, ...)`` exposes
the rates in the state, where EPD reads them too.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from molf_jax.routing._labels import ExpertLabel, path_to_str
from molf_jax.routing._route import molf_route
from molf_jax.routing._scores import Score
from molf_jax.routing._table import flatten_labels, is_masked

__all__ = ["NO_DECAY_LEAVES", "OPTIMIZER_GROUPS", "molf_adamw", "param_groups"]

FFT, FFT_NO_DECAY, LORA = "fft", "fft_no_decay", "lora"
# The groups of `param_groups`, each one AdamW of the recipe.
OPTIMIZER_GROUPS = (FFT, FFT_NO_DECAY, LORA)
# Leaf names that take no weight decay in the paper's recipe: biases and norm scales.
NO_DECAY_LEAVES = ("bias", "scale")


def param_groups(params: Any, labels: Any, no_decay: tuple[str, ...] = NO_DECAY_LEAVES) -> Any:
    """Labels each leaf ``'fft'``, ``'fft_no_decay'`` or ``'lora'`` for ``optax.partition``.

    Args:
      params: the parameter tree (linen dicts, an NNX ``State``; ``MaskedNode`` leaves, which
        ``optax.partition`` puts where another transform owns a leaf, stay ``MaskedNode``).
      labels: its expert labels (or a callable ``params -> labels``); experts >= 1 are LoRA.
      no_decay: names of the leaves (last path component as `path_to_str` writes it, so NNX's
        ``.../bias/value`` counts as ``bias``) that take no weight decay.

    Example:
      >>> import numpy as np
      >>> params = {"q": {"kernel": np.zeros(2), "bias": np.zeros(2)}}
      >>> param_groups(params, {"q": {"kernel": None, "bias": None}})
      {'q': {'bias': 'fft_no_decay', 'kernel': 'fft'}}
    """
    if not jax.tree.leaves(params, is_leaf=is_masked):
        return params  # optax.tree.map_params's placeholder (see molf_route's init)
    label_leaves = flatten_labels(labels, params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)

    def group(path, leaf, label: ExpertLabel | None):
        if is_masked(leaf):
            return leaf
        if label is not None and label.expert > 0:
            return LORA
        return FFT_NO_DECAY if path_to_str(path).rsplit("/", 1)[-1] in no_decay else FFT

    return jax.tree.unflatten(treedef, [group(p, x, l) for (p, x), l in zip(flat, label_leaves)])


def molf_adamw(
    labels: Any,
    *,
    fft_learning_rate,
    lora_learning_rate,
    fft_weight_decay: float = 0.1,
    lora_weight_decay: float = 0.01,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype=None,
    top_k: int = 1,
    score: str | Score = "epd",
    no_decay: tuple[str, ...] = NO_DECAY_LEAVES,
    groups: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """MoLF's routed AdamW with separate FFT and LoRA learning rates and weight decays.

    Args:
      labels: expert labels or a callable ``params -> labels`` (e.g. `label_lora_experts`);
        under ``optax.inject_hyperparams`` give the label tree (a callable would be taken for
        a schedule) or name it in ``static_args``.
      fft_learning_rate, lora_learning_rate: floats or optax schedules.
      fft_weight_decay, lora_weight_decay: decoupled weight decay of each group.
      b1, b2, eps, mu_dtype: Adam hyperparameters shared by all groups.
      top_k, score: routing choices, see `molf_route`.
      no_decay: names of the leaves that take no weight decay (default: biases, norm scales).
      groups: the `param_groups` tree when already known (e.g. from
        ``molf_jax.param_roles``); default: derived from ``labels`` and ``no_decay``.

    Raises:
      ValueError: a negative rate or decay, ``b1``/``b2`` outside [0, 1), ``eps`` <= 0 (the
        checks ``molf-jax train`` makes on the same settings).

    Example:
      >>> import numpy as np
      >>> from molf_jax.routing import label_lora_experts
      >>> params = {"q_proj": {"kernel": np.ones((4, 4), np.float32), "lora_1": {
      ...     "a": np.ones((4, 2), np.float32), "b": np.zeros((2, 4), np.float32)}}}
      >>> tx = molf_adamw(label_lora_experts, fft_learning_rate=1e-4, lora_learning_rate=5e-4)
      >>> # Rates in the state, readable and changeable at run time (EPD reads them there):
      >>> tx = optax.inject_hyperparams(molf_adamw)(label_lora_experts(params),
      ...                                           fft_learning_rate=1e-4,
      ...                                           lora_learning_rate=5e-4)
    """
    if labels is None:
        raise ValueError("molf_adamw: labels is None; under optax.inject_hyperparams a callable "
                         "is taken for a schedule: pass the label tree (label_lora_experts("
                         "params)) or static_args='labels'")
    _check_hyperparameters(fft_learning_rate=fft_learning_rate,
                           lora_learning_rate=lora_learning_rate,
                           fft_weight_decay=fft_weight_decay,
                           lora_weight_decay=lora_weight_decay, b1=b1, b2=b2, eps=eps)

    def adamw(lr, wd):
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, weight_decay=wd)

    inner = optax.partition(
        {
            FFT: adamw(fft_learning_rate, fft_weight_decay),
            FFT_NO_DECAY: adamw(fft_learning_rate, 0.0),
            LORA: adamw(lora_learning_rate, lora_weight_decay),
        },
        groups if groups is not None else lambda params: param_groups(params, labels, no_decay),
    )
    return molf_route(
        inner,
        labels,
        learning_rate={"fft": fft_learning_rate, "lora": lora_learning_rate},
        top_k=top_k,
        score=score,
    )


def _check_hyperparameters(**values) -> None:
    # Schedules (callables) and arrays (inject_hyperparams) are the caller's; plain numbers
    # are checked here.
    for name, value in values.items():
        if callable(value) or not isinstance(value, (int, float)):
            continue
        bad = (value <= 0 if name == "eps" else
               not 0 <= value < 1 if name in ("b1", "b2") else value < 0)
        if bad:
            rule = {"eps": "> 0", "b1": "in [0, 1)", "b2": "in [0, 1)"}.get(name, ">= 0")
            raise ValueError(f"molf_adamw: {name} must be {rule}, got {value}")

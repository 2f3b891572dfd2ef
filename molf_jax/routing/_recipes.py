"""`molf_adamw`: the paper's optimizer recipe in one call.

FFT leaves (base kernels, embeddings, unrouted linears) use the FFT learning rate and weight
decay, LoRA leaves the LoRA ones, and biases and norm scales get no weight decay; the routing
reads the same learning rates, so EPD always sees each expert's real step size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from molf_jax.routing._labels import ExpertLabel, path_to_str
from molf_jax.routing._route import molf_route
from molf_jax.routing._scores import Score
from molf_jax.routing._table import flatten_labels

__all__ = ["molf_adamw", "param_groups", "default_no_decay"]

FFT, FFT_NO_DECAY, LORA = "fft", "fft_no_decay", "lora"


def default_no_decay(path: str) -> bool:
    """Biases and norm scales take no weight decay (paper recipe)."""
    return path.rsplit("/", 1)[-1] in ("bias", "scale")


def param_groups(params: Any, labels: Any,
                 no_decay: Callable[[str], bool] = default_no_decay) -> Any:
    """Labels each leaf ``'fft'``, ``'fft_no_decay'`` or ``'lora'`` for ``optax.partition``."""
    label_leaves = flatten_labels(labels, params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)

    def group(path, label: ExpertLabel | None):
        if label is not None and label.expert > 0:
            return LORA
        return FFT_NO_DECAY if no_decay(path_to_str(path)) else FFT

    return jax.tree.unflatten(treedef, [group(p, l) for (p, _), l in zip(flat, label_leaves)])


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
    no_decay: Callable[[str], bool] = default_no_decay,
) -> optax.GradientTransformationExtraArgs:
    """MoLF's routed AdamW with separate FFT and LoRA learning rates and weight decays.

    Args:
      labels: expert labels or a callable ``params -> labels`` (e.g. `label_lora_experts`).
      fft_learning_rate, lora_learning_rate: floats or optax schedules.
      fft_weight_decay, lora_weight_decay: decoupled weight decay of each group.
      b1, b2, eps, mu_dtype: Adam hyperparameters shared by all groups.
      top_k, score: routing choices, see `molf_route`.
      no_decay: ``path -> bool``, leaves that take no weight decay (default: biases, norms).

    Example:
      >>> tx = molf_adamw(label_lora_experts, fft_learning_rate=1e-4, lora_learning_rate=5e-4)
    """

    def adamw(lr, wd):
        return optax.adamw(lr, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, weight_decay=wd)

    inner = optax.partition(
        {
            FFT: adamw(fft_learning_rate, fft_weight_decay),
            FFT_NO_DECAY: adamw(fft_learning_rate, 0.0),
            LORA: adamw(lora_learning_rate, lora_weight_decay),
        },
        lambda params: param_groups(params, labels, no_decay),
    )
    return molf_route(
        inner,
        labels,
        learning_rate={"fft": fft_learning_rate, "lora": lora_learning_rate},
        top_k=top_k,
        score=score,
    )

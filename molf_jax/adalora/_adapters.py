"""AdaLoRA adapters as leaves of a parameter tree: spec, init, merge, orthogonality penalty.

A target linear keeps its ``kernel`` [in, out] (and ``bias``) and gains one SVD-form triplet
(Zhang et al., ICLR 2023, Eq. 3: ``W + P diag(lambda) Q``), in our kernel layout::

    .../q_proj/adalora/a   [in, r]    right singular vectors   (peft's lora_A [r, in], transposed)
    .../q_proj/adalora/e   [r]        singular values          (peft's lora_E [r, 1])
    .../q_proj/adalora/b   [r, out]   left singular vectors    (peft's lora_B [out, r], transposed)

so that ``y = x @ kernel + bias + s * ((dropout(x) @ (a * e)) @ b)`` with peft's scale
``s = alpha / (init_r + 1e-5)``: peft divides by the initial rank ("ranknum") for the whole run,
however many singular values the allocator keeps. Initialised as peft does: ``e`` zeros,
``a`` and ``b`` normal(0, 0.02). With scanned layers every leaf has a leading layer axis and
each layer's slice is its own module, as in peft. The forward pass lives in
``molf_jax.models.layers.LoraLinear``; the rank allocator in ``molf_jax.adalora._allocator``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.lora import default_targets, map_linears as _map_linears, targets_match

__all__ = ["ADALORA_KEY", "AdaLoraSpec", "add_adalora", "adalora_triplets", "delta_kernel",
           "merge_adalora", "orth_regularizer", "strip_adalora"]

ADALORA_KEY = "adalora"
# peft's reset_lora_parameters: A and B ~ N(0, 0.02), E = 0.
_FACTOR_STD = 0.02
# peft's ranknum is float32(init_r), plus this in every forward pass and merge.
_RANKNUM_EPS = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraSpec:
    """Which linears get an AdaLoRA triplet, and its shape.

    Attributes:
      init_r: the triplet's rank before any pruning (peft ``init_r``, default 12).
      alpha: peft ``lora_alpha`` (default 8, peft's); the scale is ``alpha / (init_r + 1e-5)``
        (``init_r`` when ``alpha`` is 0, as peft).
      targets: module names or full-path patterns, as ``LoraSpec.targets``.
      dropout: dropout rate on the adapter's input (peft ``lora_dropout``).

    Example:
      >>> spec = AdaLoraSpec(init_r=12, alpha=8)
      >>> spec.matches("layers/0/mlp/up_proj"), round(spec.scale, 4)
      (True, 0.6667)
    """

    init_r: int = 12
    alpha: float = 8.0
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "targets", default_targets() if self.targets is None
                           else tuple(self.targets))
        if not isinstance(self.init_r, int) or self.init_r <= 0:
            raise ValueError(f"AdaLoraSpec.init_r must be a positive int, got {self.init_r!r}")
        if self.alpha < 0:
            raise ValueError(f"AdaLoraSpec.alpha must be >= 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AdaLoraSpec.dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        """``alpha / (init_r + 1e-5)``, the factor peft puts on every triplet's product."""
        numerator = self.alpha if self.alpha > 0 else float(self.init_r)
        return float(numerator / (np.float32(self.init_r) + np.float32(_RANKNUM_EPS)))

    def matches(self, module_path: str) -> bool:
        """Whether the linear at ``module_path`` gets a triplet (as ``LoraSpec.matches``)."""
        return targets_match(self.targets, module_path)


def adalora_triplets(params: Mapping, path: tuple[str, ...] = ()
                     ) -> Iterator[tuple[str, Mapping]]:
    """Yields ``(module path, {"a", "e", "b"})`` for every triplet, in tree order.

    Example:
      >>> tree = {"q_proj": {"kernel": 0, "adalora": {"a": 1, "e": 2, "b": 3}}}
      >>> [p for p, _ in adalora_triplets(tree)]
      ['q_proj']
    """
    for key, value in params.items():
        if not isinstance(value, Mapping):
            continue
        if key == ADALORA_KEY:
            yield "/".join(path), value
        else:
            yield from adalora_triplets(value, (*path, str(key)))


def add_adalora(params: Mapping, spec: AdaLoraSpec, rng: jax.Array) -> dict:
    """Adds an ``adalora/{a,e,b}`` triplet to every targeted linear, initialised as peft does.

    Example:
      >>> params = {"mlp": {"up_proj": {"kernel": jnp.zeros((8, 16))}}}
      >>> out = add_adalora(params, AdaLoraSpec(init_r=4), jax.random.key(0))
      >>> {k: v.shape for k, v in out["mlp"]["up_proj"]["adalora"].items()}
      {'a': (8, 4), 'e': (4,), 'b': (4, 16)}
    """
    counter = iter(range(1 << 30))
    targeted = []

    def add(path: str, linear: Mapping) -> dict:
        if not spec.matches(path):
            return dict(linear)
        if ADALORA_KEY in linear:
            raise ValueError(f"{path} already has an AdaLoRA triplet")
        kernel = linear["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        key_a, key_b = jax.random.split(jax.random.fold_in(rng, next(counter)))
        dtype = kernel.dtype
        targeted.append(path)
        return {**linear, ADALORA_KEY: {
            "a": (_FACTOR_STD * jax.random.normal(key_a, (*lead, fan_in, spec.init_r))
                  ).astype(dtype),
            "e": jnp.zeros((*lead, spec.init_r), dtype),
            "b": (_FACTOR_STD * jax.random.normal(key_b, (*lead, spec.init_r, fan_out))
                  ).astype(dtype),
        }}

    result = _map_linears(params, add)
    if not targeted:
        raise ValueError(f"AdaLoraSpec.targets {spec.targets} matched no linear in the tree")
    return result


def delta_kernel(triplet: Mapping, scale: float) -> jax.Array:
    """``scale * (a * e) @ b`` in float32, [.., in, out] (a leading layer axis is kept)."""
    a = jnp.asarray(triplet["a"], jnp.float32)
    e = jnp.asarray(triplet["e"], jnp.float32)
    b = jnp.asarray(triplet["b"], jnp.float32)
    return scale * jnp.matmul(a * e[..., None, :], b, precision="highest")


def merge_adalora(params: Mapping, spec: AdaLoraSpec) -> dict:
    """Folds every triplet into its kernel, ``W + s (a * e) @ b``, and drops the leaves.

    Singular values the allocator pruned are zero in ``e`` (see ``apply_rank_pattern``), so
    they contribute nothing. The sum is formed in float32 and cast back to the kernel's dtype.

    Example:
      >>> tree = {"q_proj": {"kernel": jnp.zeros((2, 2)),
      ...         "adalora": {"a": jnp.eye(2), "e": jnp.array([1.0, 0.0]), "b": jnp.eye(2)}}}
      >>> merge_adalora(tree, AdaLoraSpec(init_r=2, alpha=2))["q_proj"]["kernel"].round(3)
      Array([[1., 0.],
             [0., 0.]], dtype=float32)
    """
    def merge(path: str, linear: Mapping) -> dict:
        out = {k: v for k, v in linear.items() if k != ADALORA_KEY}
        if ADALORA_KEY in linear:
            kernel = linear["kernel"]
            merged = kernel.astype(jnp.float32) + delta_kernel(linear[ADALORA_KEY], spec.scale)
            out["kernel"] = merged.astype(kernel.dtype)
        return out

    return _map_linears(params, merge)


def strip_adalora(params: Mapping) -> dict:
    """Drops every triplet without merging (the base model as it was).

    Example:
      >>> strip_adalora({"q_proj": {"kernel": 1, "adalora": {"a": 2, "e": 3, "b": 4}}})
      {'q_proj': {'kernel': 1}}
    """
    return _map_linears(params, lambda _, linear: {k: v for k, v in linear.items()
                                                   if k != ADALORA_KEY})


def orth_regularizer(params: Mapping) -> jax.Array:
    """AdaLoRA's orthogonality penalty, as peft computes it: the mean over every ``P`` and ``Q``
    of ``||P^T P - I||_F`` (Frobenius norm, not squared; paper Eq. 4 squares it, peft does not).

    ``P`` is a layer's ``a`` [in, r] and ``Q`` its ``b`` [r, out]; each layer slice of a
    scanned leaf counts as one matrix. Multiply by ``orth_reg_weight`` and add to the loss.

    Example:
      >>> tree = {"q_proj": {"adalora": {"a": jnp.eye(3, 2), "e": jnp.zeros(2),
      ...                                "b": jnp.eye(2, 5)}}}
      >>> float(orth_regularizer(tree))
      0.0
    """
    total, count = jnp.zeros((), jnp.float32), 0
    for _, triplet in adalora_triplets(params):
        a = jnp.asarray(triplet["a"], jnp.float32)
        b = jnp.asarray(triplet["b"], jnp.float32)
        eye = jnp.eye(a.shape[-1], dtype=jnp.float32)
        for gram in (jnp.einsum("...ir,...is->...rs", a, a),
                     jnp.einsum("...ro,...so->...rs", b, b)):
            norms = jnp.sqrt(jnp.sum(jnp.square(gram - eye), axis=(-2, -1)))
            total = total + jnp.sum(norms)
            count += int(np.prod(norms.shape))
    if count == 0:
        raise ValueError("orth_regularizer: params hold no AdaLoRA triplets")
    return total / count

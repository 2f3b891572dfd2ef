"""LoRA experts as extra leaves of a parameter tree: spec, init, merge, strip.

A target linear keeps its base ``kernel`` [in, out] (and ``bias``) and gains one pair of leaves
per expert beside it, numbered from 1::

    .../q_proj/kernel        [in, out]
    .../q_proj/lora_1/a      [in, r1]     Kaiming-uniform(a=sqrt(5)) on fan-in `in`
    .../q_proj/lora_1/b      [r1, out]    zeros
    .../q_proj/lora_2/a ...

so that ``y = x @ kernel + bias + sum_i s_i * (dropout(x) @ a_i) @ b_i`` (docs/design.md
section 1).
With scanned layers every leaf under ``layers/`` has a leading layer axis, and so do the LoRA
leaves. The forward pass lives in ``molf_jax.models.layers.LoraLinear``; this module only handles
trees.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from molf_jax.projections import PROJECTIONS
from molf_jax.routing import expert_index, expert_key

__all__ = [
    "LoraExpert",
    "LoraSpec",
    "add_lora_experts",
    "default_targets",
    "expert_index",
    "expert_key",
    "lora_paths",
    "merge_lora",
    "strip_lora",
    "targets_match",
]

# Never adapted, whatever the targets say: the output head and the embedding table.
_NEVER_TARGETED = ("lm_head", "embed_tokens")


@dataclasses.dataclass(frozen=True)
class LoraExpert:
    """One LoRA expert: rank and alpha.

    Attributes:
      rank: inner dimension r of ``a`` [in, r] and ``b`` [r, out].
      alpha: numerator of the scaling; ``alpha / sqrt(rank)`` with rsLoRA, else ``alpha / rank``.
    """

    rank: int
    alpha: float

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoraExpert.rank must be a positive int, got {self.rank!r}")
        object.__setattr__(self, "alpha", float(self.alpha))

    def scale(self, rslora: bool) -> float:
        """The factor ``s`` multiplying ``(x @ a) @ b``."""
        return self.alpha / (math.sqrt(self.rank) if rslora else self.rank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """Which linears get LoRA experts, and which experts.

    Attributes:
      experts: the experts every target receives, numbered ``lora_1``, ``lora_2``, ... in order.
      targets: `default_targets()` when None (the model's projections); else each entry is
        either a module name (``"q_proj"`` matches any module with that last
        path component) or a regular expression matched in full against the module path as it
        reads in the parameter tree (``"layers/[0-3]/self_attn/.*_proj"``; with scanned layers the
        path has no layer index, e.g. ``"layers/mlp/up_proj"``). ``lm_head`` and
        ``embed_tokens`` are never targeted.
      rslora: scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of ``alpha / rank``.
      dropout: dropout rate on the LoRA input only (one mask shared by the experts of a module,
        as in ``dropout(x) @ a_i`` of docs/design.md); the base path never sees dropout.
      merged: under differentiation and without active dropout, compute a target linear as
        ``x @ (kernel + sum_i s_i a_i b_i)`` and take the experts' gradients from the kernel's
        (``molf_jax.models.merged_lora``). Same gradients, much cheaper when the kernel trains
        too (MoLF's FFT expert); wasteful when it is frozen, since the kernel's gradient is
        then computed only to be dropped.

    Example:
      >>> spec = LoraSpec(experts=(LoraExpert(16, 32), LoraExpert(128, 256)))
      >>> spec.matches("layers/0/self_attn/q_proj"), spec.matches("lm_head")
      (True, False)
    """

    experts: tuple[LoraExpert, ...] = (LoraExpert(128, 256),)
    targets: tuple[str, ...] | None = None
    rslora: bool = True
    dropout: float = 0.05
    merged: bool = False

    def __post_init__(self):
        object.__setattr__(self, "experts", tuple(self.experts))
        object.__setattr__(self, "targets", default_targets() if self.targets is None
                           else tuple(self.targets))
        if not self.experts:
            raise ValueError("LoraSpec.experts is empty; give at least one LoraExpert")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoraSpec.targets must be a non-empty tuple of names or patterns, "
                             f"got {self.targets!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        for target in self.targets:
            try:
                re.compile(target)
            except re.error as err:
                raise ValueError(f"LoraSpec.targets entry {target!r} is not a valid pattern: "
                                 f"{err}") from None

    @property
    def scales(self) -> tuple[float, ...]:
        """``s_i`` for every expert, in order."""
        return tuple(e.scale(self.rslora) for e in self.experts)

    @classmethod
    def from_peft(cls, config: Any = None, **fields) -> LoraSpec:
        """A spec from peft's names: ``r``, ``lora_alpha``, ``target_modules``,
        ``lora_dropout``, ``use_rslora``, given as keywords or read from a ``peft.LoraConfig``.

        Defaults are peft's (``r=8``, ``lora_alpha=8``, ``lora_dropout=0.0``,
        ``use_rslora=False``, targets: `default_targets`). ``r`` and ``lora_alpha`` may be
        sequences, one entry per expert (MoLF-E's ``r=(16, 128)``). A ``target_modules`` list
        names modules by their last path component; a string is one regular expression over
        the whole path, which reads ``layers/0/self_attn/q_proj`` here (``/``, not peft's ``.``).

        Raises:
          ValueError: an unknown field, unequal ``r``/``lora_alpha`` lengths, or a peft
            setting this spec cannot mean (``rank_pattern``, ``alpha_pattern``, ``use_dora``,
            ``bias`` other than ``"none"``).

        Example:
          >>> spec = LoraSpec.from_peft(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
          >>> spec.experts, spec.rslora, spec.targets
          ((LoraExpert(rank=16, alpha=32.0),), False, ('q_proj', 'v_proj'))
        """
        names = ("r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora")
        values = dict(r=8, lora_alpha=8, target_modules=None, lora_dropout=0.0, use_rslora=False)
        if config is not None:
            for name in names:
                values[name] = getattr(config, name, values[name])
            for name, neutral in (("rank_pattern", {}), ("alpha_pattern", {}),
                                  ("use_dora", False), ("bias", "none")):
                value = getattr(config, name, neutral)
                if value not in (neutral, None):
                    raise ValueError(f"LoraSpec.from_peft: peft's {name}={value!r} has no "
                                     "equivalent here; leave it at its default")
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise ValueError(f"LoraSpec.from_peft: unknown field(s) {unknown}; known: "
                             f"{list(names)}")
        values.update(fields)
        ranks = values["r"] if isinstance(values["r"], (list, tuple)) else (values["r"],)
        alphas = (values["lora_alpha"] if isinstance(values["lora_alpha"], (list, tuple))
                  else (values["lora_alpha"],) * len(ranks))
        if len(alphas) != len(ranks):
            raise ValueError(f"LoraSpec.from_peft: {len(ranks)} ranks r={values['r']} but "
                             f"{len(alphas)} lora_alpha={values['lora_alpha']}")
        targets = values["target_modules"]
        if isinstance(targets, str):
            targets = (targets,)
        elif isinstance(targets, (set, frozenset)):  # peft.LoraConfig keeps a set
            targets = sorted(targets)
        return cls(experts=tuple(LoraExpert(int(r), a) for r, a in zip(ranks, alphas)),
                   targets=None if targets is None else tuple(targets),
                   dropout=float(values["lora_dropout"]), rslora=bool(values["use_rslora"]))

    def matches(self, module_path: str) -> bool:
        """Whether the linear at ``module_path`` (``"layers/3/mlp/up_proj"``) gets experts."""
        return targets_match(self.targets, module_path)


def default_targets() -> tuple[str, ...]:
    """The LoRA targets by default: every projection of the decoder block
    (``molf_jax.projections.PROJECTIONS``, the models' own names for them).

    Example:
      >>> default_targets()[:2]
      ('q_proj', 'k_proj')
    """
    return PROJECTIONS


def targets_match(targets: tuple[str, ...], module_path: str) -> bool:
    """Whether ``module_path`` is named by ``targets`` (module names or full-path patterns, as
    ``LoraSpec.targets``); ``lm_head`` and ``embed_tokens`` never are.

    Example:
      >>> targets_match(("q_proj",), "layers/0/self_attn/q_proj")
      True
    """
    name = module_path.rsplit("/", 1)[-1]
    if name in _NEVER_TARGETED:
        return False
    return any(t == name or re.fullmatch(t, module_path) for t in targets)


@functools.partial(jax.jit, static_argnums=(1, 2))
def lora_a_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Kaiming-uniform with a=sqrt(5) on fan-in ``shape[-2]``, as torch ``nn.Linear`` does.

    That is U(-1/sqrt(in), 1/sqrt(in)); a leading layer axis (scanned trees) is allowed.
    """
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _is_linear(node: Any) -> bool:
    return (isinstance(node, Mapping) and "kernel" in node
            and not isinstance(node["kernel"], Mapping))




def map_linears(params: Mapping, fn, path: tuple[str, ...] = ()) -> dict:
    """Rebuilds ``params`` with ``fn(path_str, linear_dict)`` applied to every linear's dict."""
    out = {}
    for key, value in params.items():
        sub = (*path, str(key))
        if _is_linear(value):
            out[key] = fn("/".join(sub), value)
        elif isinstance(value, Mapping):
            out[key] = map_linears(value, fn, sub)
        else:
            out[key] = value
    return out


def add_lora_experts(params: Mapping, spec: LoraSpec, rng: jax.Array) -> dict:
    """Adds ``lora_i/{a,b}`` leaves to every targeted linear of a base parameter tree.

    Works on unscanned (``kernel`` [in, out]) and scanned (``kernel`` [L, in, out]) trees; the new
    leaves take the kernel's dtype and, for ``a``, the kernel's sharding is not assumed (place the
    result with ``jax.device_put`` if needed).

    Args:
      params: base tree (no ``lora_*`` leaves yet).
      spec: which linears and experts.
      rng: key for the ``a`` matrices (each linear and expert gets its own fold).

    Returns:
      A new tree: ``params`` plus the LoRA leaves.

    Example:
      >>> params = {"layers": {"0": {"mlp": {"up_proj": {"kernel": jnp.zeros((8, 16))}}}}}
      >>> out = add_lora_experts(params, LoraSpec(experts=(LoraExpert(4, 8),)), jax.random.key(0))
      >>> out["layers"]["0"]["mlp"]["up_proj"]["lora_1"]["a"].shape
      (8, 4)
    """
    counter = iter(range(1 << 30))
    targeted = []

    def add(path: str, linear: Mapping) -> dict:
        if not spec.matches(path):
            return dict(linear)
        existing = [k for k in linear if expert_index(str(k)) is not None]
        if existing:
            raise ValueError(f"{path} already has LoRA leaves {sorted(existing)}; "
                             "strip_lora or merge_lora first")
        kernel = linear["kernel"]
        *lead, fan_in, fan_out = kernel.shape
        out = dict(linear)
        for i, expert in enumerate(spec.experts, start=1):
            key = jax.random.fold_in(rng, next(counter))
            out[expert_key(i)] = {
                "a": lora_a_init(key, (*lead, fan_in, expert.rank), jnp.dtype(kernel.dtype)),
                "b": jnp.zeros((*lead, expert.rank, fan_out), kernel.dtype),
            }
        targeted.append(path)
        return out

    result = map_linears(params, add)
    if not targeted:
        raise ValueError(f"LoraSpec.targets {spec.targets} matched no linear in the tree")
    return result


def merge_lora(params: Mapping, spec: LoraSpec) -> dict:
    """Folds every expert into its base kernel, ``W + sum_i s_i a_i b_i``, and drops the leaves.

    The sum is formed in float32 and cast back to the kernel's dtype.

    Example:
      >>> params = {"q_proj": {"kernel": jnp.zeros((4, 3)),
      ...           "lora_1": {"a": jnp.ones((4, 2)), "b": jnp.ones((2, 3))}}}
      >>> spec = LoraSpec(experts=(LoraExpert(2, 2),), rslora=False)
      >>> float(merge_lora(params, spec)["q_proj"]["kernel"][0, 0])
      2.0
    """
    scales = spec.scales

    def merge(path: str, linear: Mapping) -> dict:
        kernel = linear["kernel"]
        delta = jnp.zeros(kernel.shape, jnp.float32)
        out = {}
        for key, value in linear.items():
            index = expert_index(str(key))
            if index is None:
                out[key] = value
                continue
            if index > len(scales):
                raise ValueError(f"{path}/{key} has no expert in the LoraSpec "
                                 f"({len(scales)} experts)")
            a = jnp.asarray(value["a"], jnp.float32)
            b = jnp.asarray(value["b"], jnp.float32)
            delta = delta + scales[index - 1] * jnp.matmul(a, b, precision="highest")
        out["kernel"] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        return out

    return map_linears(params, merge)


def strip_lora(params: Mapping) -> dict:
    """Drops every ``lora_*`` leaf without merging (the base model as it was).

    Example:
      >>> strip_lora({"q_proj": {"kernel": 1, "lora_1": {"a": 2, "b": 3}}})
      {'q_proj': {'kernel': 1}}
    """
    def strip(_, linear: Mapping) -> dict:
        return {k: v for k, v in linear.items() if expert_index(str(k)) is None}

    return map_linears(params, strip)


def lora_paths(params: Mapping) -> tuple[str, ...]:
    """The ``/``-joined paths of every LoRA leaf, sorted.

    Example:
      >>> lora_paths({"q_proj": {"kernel": 1, "lora_1": {"a": 2, "b": 3}}})
      ('q_proj/lora_1/a', 'q_proj/lora_1/b')
    """
    paths = []

    def collect(path: str, linear: Mapping) -> Mapping:
        for key, value in linear.items():
            if expert_index(str(key)) is not None:
                paths.extend(f"{path}/{key}/{leaf}" for leaf in value)
        return linear

    map_linears(params, collect)
    return tuple(sorted(paths))


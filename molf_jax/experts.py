"""MoLF experts on a model of your own: linen and NNX, and a check that the model uses them.

MoLF routes each target linear's update between its base kernel (expert 0) and LoRA experts
(``lora_1``, ``lora_2``, ...) that live beside the kernel in the parameter tree. The experts
only train if the forward pass reads them: ``y = x @ kernel + bias + sum_i s_i (x a_i) b_i``.

* linen: keep your ``nn.Dense`` layers; add the experts to the params with
  ``molf_jax.lora.add_lora_experts`` (or let ``init`` create them) and run the model inside
  ``with lora_experts(spec):``, which adds each targeted Dense's expert term.
* NNX: `add_nnx_lora_experts` replaces each targeted ``nnx.Linear`` in place by a
  `LoraExperts` module (the linear as ``base_module`` plus one ``nnx.LoRA`` per expert).
  ``nnx.LoRA`` and ``nnx.LoRALinear`` modules of your own are experts too.
* `check_experts_used` fails before training when the forward pass never reads some experts
  (e.g. ``add_lora_experts`` on a stock Dense model applied without ``lora_experts``): such
  experts get zero gradients, never win, and nothing else would say so.

The labels for ``molf_adamw``/``molf_route`` come from `label_lora_experts` in every case.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from molf_jax.lora import LoraSpec, expert_key, lora_a_init
from molf_jax.routing import ExpertLabel, label_lora_experts

__all__ = ["LoraExperts", "add_nnx_lora_experts", "check_experts_used", "lora_experts"]


# ---------------------------------------------------------------------------------------------
# linen


@contextlib.contextmanager
def lora_experts(spec: LoraSpec, *, deterministic: bool = True):
    """Runs linen models with LoRA experts on every ``nn.Dense`` that ``spec`` targets.

    Inside the context a targeted Dense (matched by its module path, ``"fc1"`` or
    ``"encoder/layers_0/q_proj"``, against ``spec.targets``) computes
    ``dense(x) + sum_i s_i (dropout(x) a_i) b_i`` with its params ``lora_<i>/{a, b}``, which
    ``init`` creates (``a`` Kaiming-uniform, ``b`` zeros) and ``apply`` reads, e.g. after
    ``molf_jax.lora.add_lora_experts`` put them beside pretrained kernels. Outside it the model
    is the stock model and the experts are ignored (`check_experts_used` catches that).

    Args:
      spec: the experts (ranks, alphas, rsLoRA), targets and dropout.
      deterministic: no dropout when True; otherwise the ``'dropout'`` rng drives it.

    Example:
      >>> spec = LoraSpec(experts=(LoraExpert(4, 8),), targets=("fc1",))  # doctest: +SKIP
      >>> with lora_experts(spec):                                       # doctest: +SKIP
      ...     params = model.init(jax.random.key(0), x)["params"]    # fc1 gets lora_1/{a,b}
      ...     y = model.apply({"params": params}, x)
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not spec.matches("/".join(module.path))):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        (x,) = args
        fan_in = jnp.shape(x)[-1]
        if spec.dropout > 0.0 and not deterministic:
            keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout,
                                        jnp.shape(x))
            x = jnp.where(keep, x / (1.0 - spec.dropout), 0.0)
        for i, (expert, scale) in enumerate(zip(spec.experts, spec.scales), start=1):
            pair = module.param(expert_key(i), _init_pair, fan_in, expert.rank, module.features,
                                module.param_dtype)
            a, b = (pair[k].astype(y.dtype) for k in ("a", "b"))
            y = y + scale * ((x.astype(y.dtype) @ a) @ b)
        return y

    with nn.intercept_methods(interceptor):
        yield


def _init_pair(key, fan_in, rank, fan_out, dtype):
    return {"a": lora_a_init(key, (fan_in, rank), jnp.dtype(dtype)),
            "b": jnp.zeros((rank, fan_out), dtype)}


# ---------------------------------------------------------------------------------------------
# NNX


class LoraExperts(nnx.Module):
    """An NNX linear with MoLF's experts: ``base_module(x) + sum_i s_i lora_i(dropout(x))``.

    Parameters: ``base_module/{kernel, bias}`` (expert 0) and ``lora_<i>/{lora_a, lora_b}``
    (an ``nnx.LoRA`` each, ``lora_a`` Kaiming-uniform, ``lora_b`` zeros), the layout
    `label_lora_experts` reads.

    Args:
      base_module: the ``nnx.Linear`` (or any module with ``in_features``/``out_features``).
      spec: the experts (ranks, alphas, rsLoRA) and dropout; ``spec.targets`` is not read.
      rngs: for the ``lora_a`` init and the dropout.

    Example:
      >>> from molf_jax.lora import LoraExpert
      >>> fc = LoraExperts(nnx.Linear(4, 8, rngs=nnx.Rngs(0)),
      ...                  LoraSpec(experts=(LoraExpert(2, 4),)), rngs=nnx.Rngs(1))
      >>> fc(jnp.ones((3, 4))).shape
      (3, 8)
    """

    def __init__(self, base_module: nnx.Module, spec: LoraSpec, *, rngs: nnx.Rngs):
        self.base_module = base_module
        self.scales = spec.scales
        self.dropout = nnx.Dropout(spec.dropout, rngs=rngs)
        dtype = getattr(base_module, "param_dtype", jnp.float32)
        for i, expert in enumerate(spec.experts, start=1):
            setattr(self, expert_key(i), nnx.LoRA(
                base_module.in_features, expert.rank, base_module.out_features,
                a_initializer=lora_a_init, b_initializer=nnx.initializers.zeros,
                param_dtype=dtype, rngs=rngs))

    def __call__(self, x):
        y = self.base_module(x)
        x = self.dropout(x)
        for i, scale in enumerate(self.scales, start=1):
            y = y + scale * getattr(self, expert_key(i))(x)
        return y


def add_nnx_lora_experts(model: nnx.Module, spec: LoraSpec, *, rngs: nnx.Rngs) -> list[str]:
    """Wraps every ``nnx.Linear`` of ``model`` that ``spec`` targets in a `LoraExperts`, in place.

    Targets match the module path as `label_lora_experts` writes it (``"fc1"``,
    ``"blocks/0/mlp/up"``). The base kernels keep their values.

    Returns:
      The paths wrapped.

    Raises:
      ValueError: ``spec.targets`` matched no ``nnx.Linear``.

    Example:
      >>> add_nnx_lora_experts(model, LoraSpec(targets=("fc1",)), rngs=nnx.Rngs(0))  # doctest: +SKIP
      ['fc1']
    """
    found = [(path, module) for path, module in nnx.iter_modules(model)
             if isinstance(module, nnx.Linear) and path
             and spec.matches("/".join(map(str, path)))]
    if not found:
        raise ValueError(f"LoraSpec.targets {spec.targets} matched no nnx.Linear of "
                         f"{type(model).__name__}")
    for path, linear in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        wrapped = LoraExperts(linear, spec, rngs=rngs)
        if isinstance(path[-1], int):
            parent[path[-1]] = wrapped
        else:
            setattr(parent, path[-1], wrapped)
    return ["/".join(map(str, path)) for path, _ in found]


# ---------------------------------------------------------------------------------------------
# The check


def check_experts_used(fn: Callable[..., Any], params: Any, *args,
                       labels: Any = label_lora_experts) -> None:
    """Fails when the forward pass never reads some LoRA experts (checked by tracing only).

    ``fn(params, *args)`` is traced once (``jax.make_jaxpr``, nothing runs); a LoRA expert
    (label with ``expert >= 1``) none of whose leaves the trace reads would get a zero gradient
    at every step and never win its module.

    Args:
      fn: the forward pass or loss, ``fn(params, *args)``.
      params: the parameter tree with its experts (arrays or ``jax.ShapeDtypeStruct``).
      *args: the rest of ``fn``'s arguments (a batch; only shapes matter).
      labels: the expert labels, or a callable ``params -> labels``.

    Raises:
      ValueError: naming the unused experts and how to make the model use them.

    Example:
      >>> check_experts_used(lambda p, x: model.apply({"params": p}, x), params, x)  # doctest: +SKIP
    """
    labels = labels(params) if callable(labels) else labels
    closed = jax.make_jaxpr(fn)(params, *args)
    jaxpr = closed.jaxpr
    read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in jaxpr.outvars}
    param_vars = jaxpr.invars[:len(jax.tree.leaves(params))]
    flat_labels = jax.tree.leaves(labels, is_leaf=lambda x: x is None or isinstance(x, ExpertLabel))
    experts: dict[tuple[str, int], bool] = {}
    for var, label in zip(param_vars, flat_labels):
        if label is None or label.expert < 1:
            continue
        key = (label.module, label.expert)
        experts[key] = experts.get(key, False) or id(var) in read
    unused = [f"{module} expert {expert}" for (module, expert), used in experts.items()
              if not used]
    if unused:
        raise ValueError(
            f"LoRA experts that the forward pass never reads: {', '.join(unused[:4])}"
            f"{f' and {len(unused) - 4} more' if len(unused) > 4 else ''} (of "
            f"{len(experts)}). They would get zero gradients and never win. A stock "
            "flax.linen.Dense ignores the lora_<i> leaves add_lora_experts puts beside its "
            "kernel: apply the model inside `with molf_jax.experts.lora_experts(spec):`, use "
            "molf_jax.experts.add_nnx_lora_experts for NNX, or a layer that reads them")

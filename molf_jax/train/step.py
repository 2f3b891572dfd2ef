"""The pure training step: ``train_step(params, opt_state, batch) -> (params, opt_state, metrics)``.

* Gradients only for trainable leaves: the tree is split by the run's parameter roles inside
  the step and ``value_and_grad`` sees the trainable part alone, so frozen kernels get no
  gradient buffers.
* Gradient accumulation: ``batch`` arrays are ``[micro, rows, length]``; a ``lax.scan`` sums
  micro-batch gradients and the optimizer (and its schedule) advances once per call.
* The loss is the mean over all target tokens of the accumulated batch; the model computes it
  (`molf_jax.models.next_token_loss`).
* A non-finite loss or gradient skips the update (params and optimizer state unchanged) and is
  reported in ``metrics['skipped']``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from molf_jax.adalora import find_allocator_state, rank_counts
from molf_jax.models import next_token_loss
from molf_jax.routing import MolfGateState, MolfRouteState
from molf_jax.train.mesh import constrain_rows, mesh_of, tracing_mesh
from molf_jax.param_roles import split_trainable
from molf_jax.trees import join_trees

__all__ = ["make_train_step", "jit_train_step", "find_route_state"]


def find_route_state(opt_state: Any) -> MolfRouteState | MolfGateState | None:
    """The routing state (`MolfRouteState` or `MolfGateState`) inside an optimizer state, or
    None; both carry this step's ``winners`` and ``scores``.

    Example:
      >>> find_route_state(optax.adamw(1e-3).init({"w": jnp.zeros(2)})) is None
      True
    """
    for state_type in (MolfRouteState, MolfGateState):
        found = optax.tree_utils.tree_get(opt_state, state_type.__name__)
        if found is not None:
            return found
    return None


def make_train_step(model, optimizer: optax.GradientTransformation, *,
                    roles: Any, seed: int = 0, loss_chunk: int = 1024,
                    dropout: bool = True, route_fft_column: bool = False,
                    return_routing: bool = True,
                    regularizer: Callable[[Any], jax.Array] | None = None,
                    loss_tokens: int | None = None) -> Callable:
    """Builds the (unjitted) training step for a flax causal LM.

    Args:
      model: a `molf_jax.models.CausalLM`.
      optimizer: over the trainable part of the params (see `build_optimizer`).
      roles: the role of each leaf of the full params tree (`molf_jax.train.mode_roles` or
        `molf_jax.param_roles.param_roles`); only trainable leaves get gradients.
      seed: dropout keys are ``fold_in(fold_in(key(seed), step), micro)``.
      loss_chunk: tokens per logits chunk in the loss.
      dropout: run the model in training mode (LoRA dropout).
      route_fft_column: report the fraction of routed modules that chose expert 0.
      return_routing: include this step's routing winners and scores in the metrics.
      regularizer: ``trainable params -> scalar`` added to the loss's gradient once per
        optimizer step (AdaLoRA's weighted orthogonality penalty); reported as
        ``metrics['regularizer']``, while ``metrics['loss']`` stays the task loss.
      loss_tokens: run the output head on at most this many target positions per micro-batch
        (`molf_jax.models.next_token_loss`); the caller bounds every batch's targets by it
        (`molf_jax.data.loss_token_budget`). None: every position (one device or a mesh).

    Returns:
      ``train_step(params, opt_state, batch)``; ``batch`` holds ``input_ids``,
      ``attention_mask``, ``loss_mask`` as int32 ``[micro, rows, length]`` and ``step``
      (int32 scalar, the optimizer step about to be taken).

    Example:
      >>> step = jax.jit(make_train_step(model, tx, roles=mode_roles(config, params)),
      ...                donate_argnums=(0, 1))                    # doctest: +SKIP
    """
    def micro_loss(train_params, frozen_params, ids, mask, loss_mask, key):
        # Rows of the hidden states stay split over the devices (FSDP: gather weights, not
        # activations). Without it XLA took the embedding lookup's replicated output through
        # the layers and split the matmuls over the model width, moving [B, T, D] activations
        # of the whole global batch several times per layer (Qwen2.5-3B, 4 devices, batch 32:
        # 27 GiB per step). Needs the mesh `jit_train_step` names while tracing; the identity
        # without one.
        return next_token_loss(model, join_trees(train_params, frozen_params), ids, mask,
                               loss_mask, chunk=loss_chunk, dropout_key=key if dropout else None,
                               constrain_hidden=constrain_rows, loss_tokens=loss_tokens)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(params, opt_state, batch):
        train_params, frozen_params = split_trainable(params, roles)
        step_key = jax.random.fold_in(jax.random.key(seed), batch["step"])

        def accumulate(carry, xs):
            grad_sum, loss_sum, count = carry
            index, ids, mask, loss_mask = xs
            (loss, n), grads = grad_fn(train_params, frozen_params, ids, mask, loss_mask,
                                       jax.random.fold_in(step_key, index))
            grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
            return (grad_sum, loss_sum + loss, count + n), None

        micro = batch["input_ids"].shape[0]
        if micro == 1:
            # No accumulator: the gradient stays in the parameters' dtype (half the memory of
            # a float32 buffer for bf16 models).
            (loss_sum, count), grad_sum = grad_fn(
                train_params, frozen_params, batch["input_ids"][0], batch["attention_mask"][0],
                batch["loss_mask"][0], jax.random.fold_in(step_key, 0))
        else:
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), train_params)
            (grad_sum, loss_sum, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)),
                (jnp.arange(micro), batch["input_ids"], batch["attention_mask"],
                 batch["loss_mask"]))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, train_params)
        grad_norm = optax.tree.norm(grad_sum) / denom
        penalty = None
        if regularizer is not None:
            penalty, penalty_grads = jax.value_and_grad(regularizer)(train_params)
            grads = jax.tree.map(lambda g, r: (g + r).astype(g.dtype), grads, penalty_grads)
            grad_norm = optax.tree.norm(grads)
        loss = loss_sum / denom
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(operands):
            grads, opt_state, train_params = operands
            updates, new_opt_state = optimizer.update(grads, opt_state, train_params)
            return optax.apply_updates(train_params, updates), new_opt_state

        def skip(operands):
            _, opt_state, train_params = operands
            return train_params, opt_state

        # A branch, not a select of the new values against the old: with the select, the old
        # Adam moments had to outlive the new ones written into the donated state (the fused
        # parameter update recomputed the new moments from the old), and XLA copied the old
        # moments of Qwen2.5-3B's MLP kernels for it: 9.1 GiB of molf's 34.8 GiB peak (buffer
        # assignment on the H200; docs/performance.md, "Larger models, memory, and the trainer").
        new_train, new_opt_state = jax.lax.cond(finite, update, skip,
                                                (grads, opt_state, train_params))

        metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": count,
                   "skipped": jnp.logical_not(finite)}
        if penalty is not None:
            metrics["regularizer"] = penalty
        allocator = find_allocator_state(new_opt_state)
        if allocator is not None:
            metrics["adalora_ranks"] = rank_counts(allocator)
            metrics["adalora_budget"] = allocator.budget
        route = find_route_state(new_opt_state)
        if route is not None:
            if route_fft_column:
                metrics["fft_fraction"] = jnp.mean(route.winners[:, 0].astype(jnp.float32))
            metrics["expert_fraction"] = jnp.mean(route.winners.astype(jnp.float32), axis=0)
            if return_routing:
                metrics["route_winners"] = route.winners
                metrics["route_scores"] = route.scores
        return join_trees(new_train, frozen_params), new_opt_state, metrics

    return train_step


def jit_train_step(step_fn: Callable, params: Any, opt_state: Any) -> Callable:
    """Jits a training step with donated state whose outputs keep the inputs' shardings.

    Pinning the output shardings matters on a mesh: left to itself XLA may return params laid
    out differently from how they came in, and the next call would then compile again. Pass
    trees already placed with `molf_jax.train.mesh.on_mesh`. The params' mesh is the ambient
    mesh while the step is traced (`molf_jax.train.mesh.tracing_mesh`), which lets the step
    keep activations split by rows.
    """
    shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    mesh = mesh_of(params)

    @functools.wraps(step_fn)  # keeps the step's own name (train_step) in HLO dumps and profiles
    def step_on_mesh(*args):
        with tracing_mesh(mesh):
            return step_fn(*args)

    return jax.jit(step_on_mesh, donate_argnums=(0, 1),
                   out_shardings=(shardings(params), shardings(opt_state), None))

"""A model's training loss: next-token cross-entropy on target tokens, through its own head.

`next_token_loss` runs the decoder, applies the model's output head (``lm_head`` or the tied
embedding, and Gemma's final logit soft-cap) and sums the loss, so a training step never asks
how a family ends. `next_token_loss_sum` is the chunked head + loss on given hidden states.


The final hidden states are multiplied by the output kernel one chunk of tokens at a time inside
a rematerialised ``lax.scan``: the forward pass keeps only per-token log-sum-exp and target
logits, and the backward pass recomputes each chunk's logits. With Gemma's 262k vocabulary this
is the difference between ~1 GiB per 1k tokens and a few MiB.

A tied head multiplies by the embedding as it is stored, [V, D] (``vocab_major``), not by its
transpose: the gradient then accumulates over the chunks in the embedding's own layout. With the
transpose, XLA kept the accumulated gradient [D, V] and fused a transpose into the optimizer's
update of the embedding: 27 of the 92 ms of a 5-member molf step on fact (H100; `python
scripts/bench_sweep.py --trace`, kernel ``input_transpose_fusion``).

With ``loss_tokens`` the head runs only on the positions that have a target: their first
``loss_tokens`` are gathered before the head (the caller guarantees no batch has more). Prompts
and padding never reach the 262k-word matmul; a fine-tuning batch whose targets are a tenth of
its tokens spends a tenth of the head's work. The sum is the same terms in another order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from molf_jax.models.layers import soft_cap
from molf_jax.models.registry import output_kernel

__all__ = ["next_token_loss", "next_token_loss_sum"]


def next_token_loss(model, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                    loss_mask: jax.Array, *, chunk: int = 1024,
                    dropout_key: jax.Array | None = None,
                    constrain_hidden: Callable[[jax.Array], jax.Array] = lambda h: h,
                    loss_tokens: int | None = None,
                    ) -> tuple[jax.Array, jax.Array]:
    """Sum of target-token losses of a `CausalLM` and the number of target tokens.

    Args:
      model: a `molf_jax.models.CausalLM`; params: its parameters.
      input_ids, attention_mask, loss_mask: [B, T] int arrays (the mask marks target tokens).
      chunk: tokens per logits chunk (bounds the logits' memory).
      dropout_key: runs the model in training mode (LoRA dropout) with this key; None:
        deterministic.
      constrain_hidden: applied to the final hidden states before the head (a training step
        pins their sharding here).
      loss_tokens: when given, the head runs on at most this many target positions
        (`next_token_loss_sum`); None: on every position.

    Returns:
      (loss_sum float32 scalar, target_count float32 scalar).

    Example:
      >>> total, count = next_token_loss(model, params, ids, mask, mask)   # doctest: +SKIP
      >>> mean_loss = total / count                                        # doctest: +SKIP
    """
    hidden = model.apply({"params": params}, input_ids, attention_mask,
                         deterministic=dropout_key is None, return_hidden=True,
                         rngs=None if dropout_key is None else {"dropout": dropout_key})
    if model.config.tie_word_embeddings:
        head, vocab_major = params["embed_tokens"]["embedding"], True
    else:
        head, vocab_major = output_kernel(params, model.config), False
    return next_token_loss_sum(constrain_hidden(hidden), head, input_ids, loss_mask,
                               chunk=chunk, softcap=model.config.final_logit_softcapping,
                               loss_tokens=loss_tokens, vocab_major=vocab_major)


def next_token_loss_sum(hidden: jax.Array, output_kernel: jax.Array, input_ids: jax.Array,
                        loss_mask: jax.Array, *, chunk: int = 1024,
                        softcap: float | None = None,
                        loss_tokens: int | None = None,
                        vocab_major: bool = False) -> tuple[jax.Array, jax.Array]:
    """Sum of target-token losses and the number of target tokens.

    Position t predicts token t+1, which counts when ``loss_mask[:, t+1]`` is 1 (the shared batch
    contract: the mask marks target tokens).

    Args:
      hidden: [B, T, D] final (normed) hidden states.
      output_kernel: [D, V] lm_head kernel, or with ``vocab_major`` a [V, D] tied embedding.
      input_ids, loss_mask: [B, T] int arrays.
      chunk: tokens per logits chunk.
      softcap: final logit soft-capping (cap * tanh(logits / cap)) when the model has one.
      loss_tokens: gather the first this many target positions (in row-major order) and run
        the head on them alone; a batch with more targets would lose the rest, so the caller
        bounds it (`molf_jax.data.loss_token_budget`). None: every position.
      vocab_major: ``output_kernel`` is [V, D] (the same logits; its gradient keeps that
        layout).

    Returns:
      (loss_sum float32 scalar, target_count float32 scalar).

    Example:
      >>> total, count = next_token_loss_sum(h, w, ids, mask)   # doctest: +SKIP
      >>> mean_loss = total / count                             # doctest: +SKIP
    """
    b, t, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    targets = input_ids[:, 1:].reshape(-1)
    weights = loss_mask[:, 1:].reshape(-1).astype(jnp.float32)
    if loss_tokens is not None and loss_tokens < h.shape[0]:
        picked = jnp.nonzero(weights > 0, size=loss_tokens, fill_value=0)[0]
        real = jnp.arange(loss_tokens) < jnp.sum(weights > 0)
        h, targets = h[picked], targets[picked]
        weights = jnp.where(real, weights[picked], 0.0)
    n = h.shape[0]
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    h = h.reshape(-1, chunk, d)
    targets = targets.reshape(-1, chunk)
    weights = weights.reshape(-1, chunk)

    @jax.checkpoint
    def chunk_loss(h_c, y_c, w_c):
        if vocab_major:
            logits = jnp.einsum("cd,vd->cv", h_c, output_kernel.astype(h_c.dtype),
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.dot(h_c, output_kernel.astype(h_c.dtype),
                             preferred_element_type=jnp.float32)
        logits = soft_cap(logits, softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target) * w_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))
    return total, jnp.sum(weights)

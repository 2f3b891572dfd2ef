"""Next-token cross-entropy on target tokens, without materialising [B, T, V] float32 logits.

The final hidden states are multiplied by the output kernel one chunk of tokens at a time inside
a rematerialised ``lax.scan``: the forward pass keeps only per-token log-sum-exp and target
logits, and the backward pass recomputes each chunk's logits. With Gemma's 262k vocabulary this
is the difference between ~1 GiB per 1k tokens and a few MiB.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["next_token_loss_sum"]


def next_token_loss_sum(hidden: jax.Array, output_kernel: jax.Array, input_ids: jax.Array,
                        loss_mask: jax.Array, *, chunk: int = 1024,
                        softcap: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Sum of target-token losses and the number of target tokens.

    Position t predicts token t+1, which counts when ``loss_mask[:, t+1]`` is 1 (the shared batch
    contract: the mask marks target tokens).

    Args:
      hidden: [B, T, D] final (normed) hidden states.
      output_kernel: [D, V] lm_head kernel or tied embedding transposed.
      input_ids, loss_mask: [B, T] int arrays.
      chunk: tokens per logits chunk.
      softcap: final logit soft-capping (cap * tanh(logits / cap)) when the model has one.

    Returns:
      (loss_sum float32 scalar, target_count float32 scalar).

    Example:
      >>> total, count = next_token_loss_sum(h, w, ids, mask)   # doctest: +SKIP
      >>> mean_loss = total / count
    """
    b, t, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    targets = input_ids[:, 1:].reshape(-1)
    weights = loss_mask[:, 1:].reshape(-1).astype(jnp.float32)
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
        logits = jnp.dot(h_c, output_kernel.astype(h_c.dtype),
                         preferred_element_type=jnp.float32)
        if softcap:
            logits = softcap * jnp.tanh(logits / softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return jnp.sum((lse - target) * w_c)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))
    return total, jnp.sum(weights)

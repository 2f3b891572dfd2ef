"""Greedy decoding with a KV cache, jitted end to end (prefill + ``lax.while_loop``)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.models import CausalLM, init_cache, output_kernel

__all__ = ["greedy_generate"]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _generate(params: Any, input_ids: jax.Array, attention_mask: jax.Array, eos_ids: jax.Array,
              pad: jax.Array, *, model: CausalLM, max_new_tokens: int) -> jax.Array:
    batch, prompt_len = input_ids.shape
    total = prompt_len + max_new_tokens
    cache = init_cache(model.config, batch, total, dtype=model.dtype,
                       scan_layers=model.scan_layers)
    mask = jnp.concatenate(
        [attention_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], 1)
    hidden, cache = model.apply({"params": params}, input_ids, mask, cache=cache, cache_index=0,
                                return_hidden=True)
    # Only the last prompt position meets the vocabulary: the whole prompt's logits would be
    # 12.9 GB in float32 for 32 SQL prompts of 384 tokens with Gemma's 262k tokens. Logit
    # soft-capping is monotonic, so the argmax needs none.
    last = hidden[:, -1]
    token = jnp.argmax(last @ output_kernel(params, model.config).astype(last.dtype),
                       axis=-1).astype(jnp.int32)

    def cond(state):
        step, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, token, done, out, cache, mask = state
        out = out.at[:, step].set(jnp.where(done, pad, token))
        done = done | jnp.isin(token, eos_ids)
        slot = prompt_len + step
        mask = mask.at[:, slot].set(1)
        logits, cache = model.apply({"params": params}, token[:, None], mask, cache=cache,
                                    cache_index=slot)
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return step + 1, token, done, out, cache, mask

    out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
    state = (jnp.int32(0), token, jnp.zeros((batch,), bool), out, cache, mask)
    return jax.lax.while_loop(cond, body, state)[3]


def greedy_generate(model: CausalLM, params: Any, input_ids: Any, attention_mask: Any, *,
                    max_new_tokens: int, eos_token_id: int | Sequence[int] | None,
                    pad_token_id: int) -> np.ndarray:
    """Greedy continuation of left-padded prompts.

    Each row stops at its first EOS (the EOS is kept); every later slot holds ``pad_token_id``.
    The loop ends early once all rows are done. Compiled once per model, shape and settings.

    Args:
      model: a ``CausalLM`` (``molf_jax.models.build_model``); LoRA leaves in ``params`` are
        used if the model was built with their spec.
      params: its parameters.
      input_ids: [B, P] int prompts, left-padded.
      attention_mask: [B, P], 1 on real tokens.
      max_new_tokens: tokens to generate per row.
      eos_token_id: one id, several, or None (never stop early).
      pad_token_id: filler after EOS.

    Returns:
      int32 array [B, max_new_tokens].

    Example:
      >>> out = greedy_generate(model, params, ids, mask, max_new_tokens=20,
      ...                       eos_token_id=config.eos_token_id, pad_token_id=0)   # doctest: +SKIP
    """
    ids = np.asarray(input_ids, np.int32)
    mask = np.asarray(attention_mask, np.int32)
    if ids.shape != mask.shape or ids.ndim != 2:
        raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be "
                         "[batch, prompt_len]")
    if not mask[:, -1].all() or (np.diff(mask, axis=1) < 0).any():
        raise ValueError("greedy_generate needs left-padded prompts: each attention_mask row "
                         "must be 0...0 1...1 and end with a real token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_token_id is None:
        eos = ()
    elif isinstance(eos_token_id, (int, np.integer)):
        eos = (int(eos_token_id),)
    else:
        eos = tuple(int(e) for e in eos_token_id)
    # EOS ids and pad are traced, so changing them does not recompile; -1 never matches.
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    out = _generate(params, jnp.asarray(ids), jnp.asarray(mask), eos_ids,
                    jnp.asarray(pad_token_id, jnp.int32), model=model,
                    max_new_tokens=int(max_new_tokens))
    return np.asarray(out)

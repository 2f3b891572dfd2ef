"""Does greedy decoding write a given completion? One forward pass per batch answers it.

Greedy decoding writes ``completion`` after ``prompt`` exactly when, fed ``prompt + completion``,
the model's argmax at each position is the next completion token: every greedy step then sees
the same tokens the forced pass saw. So one batched forward pass checks many prompts at once,
where generation needs a pass per new token (``scripts/known_facts.py`` checks 3,371 Med facts
this way). The check is on token ids: a model that would spell the same text with other tokens
does not count as writing it.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.eval._runner import _progress, prompt_batches
from molf_jax.models import output_kernel


# One compilation per (model, batch shape, tail), shared by every call: scoring many trained
# members of a sweep with one model compiles once.
@functools.partial(jax.jit, static_argnames=("model", "tail"))
def _last_argmax(params, input_ids, attention_mask, *, model, tail: int):
    hidden = model.apply({"params": params}, input_ids, attention_mask, deterministic=True,
                         return_hidden=True)
    kernel = output_kernel(params, model.config)
    # Logit soft-capping is monotonic, so the argmax needs none.
    logits = hidden[:, -tail:, :].astype(jnp.float32) @ kernel.astype(jnp.float32)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def teacher_forced_argmax(model, params: Any, prompts: Sequence[Sequence[int]],
                          completions: Sequence[Sequence[int]], *, pad_id: int,
                          batch_size: int, pad_to_multiple_of: int = 8) -> list[np.ndarray]:
    """The model's argmax after each prompt and after each token of its completion.

    Row ``i`` holds ``len(completions[i]) + 1`` tokens: greedy decoding from ``prompts[i]``
    writes ``completions[i]`` iff ``row[:-1]`` equals it, and then writes ``row[-1]``.
    Sequences are sorted by length, left-padded to a multiple of ``pad_to_multiple_of`` and
    filled to ``batch_size`` rows, so the jitted pass compiles once per length bucket; only
    the last positions are projected onto the vocabulary.

    Args:
      model: a ``CausalLM`` (``molf_jax.models.build_model``). params: its parameters.
      prompts: token ids of each prompt (with BOS if the model expects one).
      completions: token ids of each prompt's completion (may be empty).
      pad_id: filler token of the left padding.
      batch_size: rows per forward pass.

    Example:
      >>> rows = teacher_forced_argmax(model, params, [[2, 9, 4]], [[7, 7]], pad_id=0,
      ...                              batch_size=1)   # doctest: +SKIP
      >>> rows[0].shape, bool((rows[0][:-1] == [7, 7]).all())   # doctest: +SKIP
      ((3,), True)
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    # The window of last positions, rounded up to 8 so that calls with other completions
    # (another seed's records) mostly reuse one compilation; a wider window changes nothing.
    tail = -(-(max((len(c) for c in completions), default=0) + 1) // 8) * 8

    sequences = [list(p) + list(c) for p, c in zip(prompts, completions)]
    rows: list[np.ndarray] = [np.zeros(0, np.int32)] * len(sequences)
    with _progress(len(sequences), "forced") as progress:
        for index, ids, mask in prompt_batches(sequences, batch_size=batch_size, pad_id=pad_id,
                                               pad_to_multiple_of=pad_to_multiple_of):
            if ids.shape[1] < tail:  # the window of the last `tail` positions must fit
                ids, mask = (np.pad(a, ((0, 0), (tail - a.shape[1], 0))) for a in (ids, mask))
                ids[mask == 0] = pad_id
            predicted = np.asarray(_last_argmax(params, ids, mask, model=model, tail=tail))
            for row, i in enumerate(index):
                rows[i] = predicted[row, tail - 1 - len(completions[i]):]
            progress.update(len(index))
    return rows

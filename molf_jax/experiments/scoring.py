"""Per-case test scores of a model on a task, in large batches, compiled once per model shape.

A sweep scores dozens of trained members with one model; every jitted function here takes the
parameters as an argument (never as a constant), so all members share one compilation per
batch shape. Fact needs one forward pass per prompt (the next-token logits of the two
targets); Med and the forgetting probe are short continuations, decided exactly by one
teacher-forced pass (`molf_jax.eval.teacher_forced_argmax`); SQL generates and executes.

Scores are per case so that the paired bootstrap (`molf_jax.experiments.stats`) can resample
cases: ``{"correct": [0/1, ...]}`` for sql and med, ``{"paraphrase", "neighborhood",
"efficacy"}`` for fact.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from molf_jax.data import prompt_ids, sql_example
from molf_jax.eval import (decode_generation, extract_sql, fact_queries, fact_scores,
                           pad_token_id, prompt_batches, sql_metrics)
from molf_jax.generation import greedy_generate
from molf_jax.models import output_kernel, soft_cap

__all__ = ["case_scores", "SQL_MAX_NEW_TOKENS"]

# The offline SQL answers are at most 42 tokens with Gemma 3's tokenizer (the gpu preset's
# evaluation sets of seeds 0-2; tests/test_gguf.py keeps 16 tokens of room after the longest and
# its EOS). Generation stops early once every row has written EOS, but one row that never does
# runs the whole batch to the limit (the base model and AdaLoRA's near-base runs always do).
SQL_MAX_NEW_TOKENS = 64


@functools.partial(jax.jit, static_argnames=("model",))
def _target_logits(params, input_ids, attention_mask, new_ids, true_ids, *, model):
    """Last-position logits of each row's two targets (only two columns leave the device)."""
    hidden = model.apply({"params": params}, input_ids, attention_mask, deterministic=True,
                         return_hidden=True)
    kernel = output_kernel(params, model.config).astype(jnp.float32)
    logits = soft_cap(hidden[:, -1, :].astype(jnp.float32) @ kernel,
                      model.config.final_logit_softcapping)
    rows = jnp.arange(logits.shape[0])
    return logits[rows, new_ids], logits[rows, true_ids]


def _fact_cases(model, params, tokenizer, records, batch_size: int) -> dict[str, list[float]]:
    queries, _ = fact_queries(records, tokenizer)
    token_lists = [prompt_ids(tokenizer, q.prompt) + list(q.prefix) for q in queries]
    new, true = np.zeros(len(queries)), np.zeros(len(queries))
    for index, ids, mask in prompt_batches(token_lists, batch_size=batch_size,
                                           pad_id=pad_token_id(tokenizer), pad_to_multiple_of=16):
        pick = index + [index[-1]] * (len(ids) - len(index))
        new_ids = np.asarray([queries[i].new_id for i in pick], np.int32)
        true_ids = np.asarray([queries[i].true_id for i in pick], np.int32)
        a, b = jax.device_get(_target_logits(params, ids, mask, new_ids, true_ids, model=model))
        new[index], true[index] = a[:len(index)], b[:len(index)]
    by_case: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        by_case.setdefault(q.case, []).append(i)
    out: dict[str, list[float]] = {"paraphrase": [], "neighborhood": [], "efficacy": []}
    for case in range(len(records)):
        picked = by_case.get(case, [])
        scores = fact_scores([queries[i] for i in picked], new[picked], true[picked],
                             num_cases=1, skipped=0)
        for part in out:
            out[part].append(scores[f"{part}_score"]["value"])
    return out


def _sql_cases(model, params, tokenizer, records, batch_size: int) -> dict[str, list[float]]:
    token_lists = [prompt_ids(tokenizer, sql_example(r).prompt) for r in records]
    texts = [""] * len(records)
    # Prompts padded to a multiple of 128: the generation loop compiles for few lengths.
    for index, ids, mask in prompt_batches(token_lists, batch_size=batch_size,
                                           pad_id=pad_token_id(tokenizer),
                                           pad_to_multiple_of=128):
        out = greedy_generate(model, params, ids, mask, max_new_tokens=SQL_MAX_NEW_TOKENS,
                              eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=pad_token_id(tokenizer))
        for row, i in enumerate(index):
            texts[i] = decode_generation(tokenizer, out[row])
    return {"correct": [sql_metrics([extract_sql(t)], [r])["execution_accuracy"]["value"]
                        for t, r in zip(texts, records)]}


def _med_cases(model, params, tokenizer, records, batch_size: int) -> dict[str, list[float]]:
    from molf_jax.eval import med_text_correct_forced

    return {"correct": [float(c) for c in
                        med_text_correct_forced(model, params, tokenizer, records,
                                                batch_size=batch_size,
                                                pad_to_multiple_of=64)]}


def case_scores(task: str, model, params: Any, tokenizer, records: Sequence[dict], *,
                batch_size: int = 256) -> dict[str, list[float]]:
    """Per-case scores of ``records`` under ``params`` (a model without adapters: merge first).

    Example:
      >>> cases = case_scores("fact", model, params, tokenizer, records)   # doctest: +SKIP
      >>> molf_jax.experiments.metric_of("fact", cases)                    # doctest: +SKIP
    """
    if task == "fact":
        return _fact_cases(model, params, tokenizer, records, batch_size)
    if task == "sql":
        return _sql_cases(model, params, tokenizer, records, batch_size)
    if task == "med":
        return _med_cases(model, params, tokenizer, records, batch_size)
    raise ValueError(f"unknown task {task!r}")

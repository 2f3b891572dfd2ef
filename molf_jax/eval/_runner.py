"""Batched evaluation of a task: prompts -> left-padded batches -> generation/logits -> metrics.

The model is reached through two small callables, so the same code scores a JAX model (the
default: ``molf_jax.generation.greedy_generate`` and a jitted forward pass), a transformers
torch model (``molf_jax.eval.hf_torch``), or a fake in a unit test:

* ``generate_fn(input_ids, attention_mask) -> tokens [B, max_new_tokens]`` (left-padded int32
  prompts in; tokens after EOS are padding);
* ``next_token_logits_fn(input_ids, attention_mask) -> logits [B, V]`` at the last position.

Prompts are sorted by length before batching (less padding) and each batch is padded to a
multiple of ``pad_to_multiple_of`` tokens and to a full ``batch_size`` rows, so a jitted
model compiles once per length bucket.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from molf_jax.data import (
    AUTHORS,
    MOLF_JAX,
    PROTOCOL_SETTINGS,
    PROTOCOLS,
    TASKS,
    answers_with_text,
    eval_prompt,
    eval_prompt_ids,
    pad_token_id,
    prompt_ids,
)
from molf_jax.eval._authors_fact import (
    authors_fact_queries,
    authors_fact_scores,
    authors_probabilities,
    uses_bf16_softmax,
)
from molf_jax.eval._authors_mcq import authors_med_metrics
from molf_jax.eval._authors_sql import authors_sql_metrics
from molf_jax.eval._fact_metrics import fact_queries, fact_scores
from molf_jax.eval._med_metrics import med_metrics
from molf_jax.eval._sql_metrics import extract_sql, sql_metrics

GenerateFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Our generation budgets; the authors' protocol uses theirs (PROTOCOL_SETTINGS).
DEFAULT_MAX_NEW_TOKENS = dict(PROTOCOL_SETTINGS[MOLF_JAX].max_new_tokens)


def left_pad(
    rows: Sequence[Sequence[int]], *, pad_id: int, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to ``length``; returns int32 (input_ids, attention_mask) [B, T].

    Example:
      >>> ids, mask = left_pad([[5, 6], [7]], pad_id=0, length=3)
      >>> ids.tolist(), mask.tolist()
      ([[0, 5, 6], [0, 0, 7]], [[0, 1, 1], [0, 0, 1]])
    """
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for b, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"prompt of {len(row)} tokens does not fit in length {length}")
        if row:
            ids[b, length - len(row) :] = row
            mask[b, length - len(row) :] = 1
    return ids, mask


def prompt_batches(
    token_lists: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    pad_to_multiple_of: int = 32,
) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
    """Yields (indices of the real rows, input_ids, attention_mask) over length-sorted prompts.

    The last batch is filled to ``batch_size`` rows by repeating its last prompt; the indices
    name only the real rows, in batch row order.
    """
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        rows = [token_lists[i] for i in index]
        rows += [rows[-1]] * (batch_size - len(rows))
        longest = max(len(r) for r in rows)
        length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        ids, mask = left_pad(rows, pad_id=pad_id, length=length)
        yield index, ids, mask


def decode_generation(tokenizer, tokens: Sequence[int]) -> str:
    """Decodes generated tokens up to (not including) the first EOS, without special tokens."""
    tokens = [int(t) for t in tokens]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def generate_texts(
    prompts: Sequence[str],
    tokenizer,
    generate_fn: GenerateFn,
    *,
    batch_size: int,
    pad_to_multiple_of: int = 32,
    protocol: str = MOLF_JAX,
) -> list[str]:
    """Generates a continuation for every prompt, in batches; returns the decoded texts.

    Prompts are tokenised as ``protocol`` evaluates them (:func:`molf_jax.data.eval_prompt_ids`).
    """
    token_lists = [eval_prompt_ids(tokenizer, p, protocol=protocol) for p in prompts]
    texts: list[str] = [""] * len(prompts)
    with _progress(len(prompts), "generate") as progress:
        for index, ids, mask in prompt_batches(
            token_lists, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
            pad_to_multiple_of=pad_to_multiple_of,
        ):
            tokens = np.asarray(generate_fn(ids, mask))
            for row, i in enumerate(index):
                texts[i] = decode_generation(tokenizer, tokens[row])
            progress.update(len(index))
    return texts


def _progress(total: int, what: str):
    """A progress bar on stderr (prompts/s and ETA); gone when done, so tables print clean."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"eval: {what}", unit="prompt", leave=False,
                dynamic_ncols=True, file=sys.stderr)


def jax_generate_fn(model, params, tokenizer, *, max_new_tokens: int) -> GenerateFn:
    """Greedy generation with the JAX model through ``molf_jax.generation.greedy_generate``."""
    from molf_jax.generation import greedy_generate

    eos, pad = tokenizer.eos_token_id, pad_token_id(tokenizer)

    def generate(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return greedy_generate(
            model, params, input_ids, attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=eos, pad_token_id=pad,
        )

    return generate


def jax_next_token_logits_fn(model, params) -> LogitsFn:
    """Last-position logits of the JAX model, one jitted forward pass per batch shape.

    Only the last position is projected onto the vocabulary (final hidden state times
    ``molf_jax.models.output_kernel``), so no [B, T, V] array is built. Logit soft-capping is
    applied when the config sets it: it never changes which token is more probable, but the
    authors' scoring rounds probabilities, so their values must be the model's.
    """
    import jax
    import jax.numpy as jnp

    from molf_jax.models import output_kernel, soft_cap

    @jax.jit
    def last_logits(params, input_ids, attention_mask):
        hidden = model.apply(
            {"params": params}, input_ids, attention_mask, deterministic=True, return_hidden=True
        )
        kernel = output_kernel(params, model.config).astype(jnp.float32)
        logits = hidden[:, -1, :].astype(jnp.float32) @ kernel
        return soft_cap(logits, model.config.final_logit_softcapping)

    return lambda ids, mask: np.asarray(last_logits(params, ids, mask))


def _evaluate_generation(task, records, tokenizer, generate_fn, batch_size, pad_multiple,
                         sql_with_context, protocol):
    if task == "med" and protocol == AUTHORS and any(answers_with_text(r) for r in records):
        raise ValueError("Med records answered with the option's text (the offline task) have "
                         "no authors' protocol (theirs answers with a letter); use "
                         "protocol='molf_jax'")
    prompts = [eval_prompt(task, r, sql_with_context=sql_with_context, protocol=protocol)
               for r in records]
    texts = generate_texts(prompts, tokenizer, generate_fn, batch_size=batch_size,
                           pad_to_multiple_of=pad_multiple, protocol=protocol)
    if task == "sql":
        ours = sql_metrics([extract_sql(t) for t in texts], records)
        return {**authors_sql_metrics(texts, records), **ours} if protocol == AUTHORS else ours
    ours = med_metrics(texts, records)
    return {**authors_med_metrics(texts, records), **ours} if protocol == AUTHORS else ours


def _last_logits(token_lists, tokenizer, logits_fn, batch_size, pad_multiple, read):
    """Runs each distinct token list once; ``read(index, logits_row)`` collects what it needs."""
    distinct: dict[tuple[int, ...], list[int]] = {}
    for i, tokens in enumerate(token_lists):
        distinct.setdefault(tuple(tokens), []).append(i)
    keys = list(distinct)
    with _progress(len(keys), "score prompts") as progress:
        for index, ids, mask in prompt_batches(
            keys, batch_size=batch_size, pad_id=pad_token_id(tokenizer),
            pad_to_multiple_of=pad_multiple,
        ):
            logits = np.asarray(logits_fn(ids, mask), dtype=np.float32)
            for row, k in enumerate(index):
                for i in distinct[keys[k]]:
                    read(i, logits[row])
            progress.update(len(index))


def _evaluate_fact(records, tokenizer, logits_fn, batch_size, pad_multiple, protocol):
    queries, skipped = fact_queries(records, tokenizer)
    token_lists = [prompt_ids(tokenizer, q.prompt) + list(q.prefix) for q in queries]
    theirs = authors_fact_queries(records, tokenizer) if protocol == AUTHORS else []
    token_lists += [eval_prompt_ids(tokenizer, q.prompt, protocol=AUTHORS) for q in theirs]
    ours_logits = np.zeros((len(queries), 2), dtype=np.float64)
    their_probs = np.zeros((len(theirs), 2), dtype=np.float64)

    def read(i, logits):
        if i < len(queries):
            ours_logits[i] = logits[[queries[i].new_id, queries[i].true_id]]
            return
        q = theirs[i - len(queries)]
        their_probs[i - len(queries)] = authors_probabilities(
            logits[None], np.array([[q.new_id, q.true_id]]), bf16_softmax=uses_bf16_softmax(q))[0]

    _last_logits(token_lists, tokenizer, logits_fn, batch_size, pad_multiple, read)
    ours = fact_scores(queries, ours_logits[:, 0], ours_logits[:, 1],
                       num_cases=len(records), skipped=skipped)
    if protocol != AUTHORS:
        return ours
    return {**authors_fact_scores(theirs, their_probs[:, 0], their_probs[:, 1]), **ours}


def evaluate_task(
    task_name: str,
    model,
    params,
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    sql_with_context: bool = True,
    pad_to_multiple_of: int = 32,
    generate_fn: GenerateFn | None = None,
    next_token_logits_fn: LogitsFn | None = None,
    protocol: str = MOLF_JAX,
) -> dict[str, dict[str, float | int]]:
    """Scores ``model`` on task records; returns ``{metric: {'value': v, 'n': samples}}``.

    Metrics: 'sql' -> exact_match, execution_accuracy, execution_gold_failed (count);
    'med' -> accuracy, no_letter (count), or for records answered with the option's text
    (the offline task) accuracy, valid_option (share); 'fact' -> efficacy_score,
    paraphrase_score, neighborhood_score, skipped_target_prefix (count). Under ``protocol='authors'`` the
    prompts, tokens and generation budgets are the authors' and their metrics come first, named
    ``authors_*`` (SQL fractions, Med and Fact x100, as they report them), then ours on the same
    generations; :data:`molf_jax.eval.REPORTED_METRICS` names the one each task reports.

    Args:
      task_name: 'sql', 'med' or 'fact'.
      model: a flax module called as ``model.apply({'params': params}, ids, mask, ...)``
        (unused when both callables below are given).
      params: its parameters.
      tokenizer: the model's transformers tokenizer.
      records: hub-format records (see :func:`molf_jax.data.load_task`).
      batch_size: prompts per batch.
      max_new_tokens: generation budget (default: the protocol's; ours 256 for SQL and 8 for
        Med, the authors' 1024 and 256).
      sql_with_context: SQL prompts include the schema (``sql_context``).
      pad_to_multiple_of: prompt length rounding (fewer jit compilations).
      generate_fn: replaces the JAX greedy generation (see the module docstring).
      next_token_logits_fn: replaces the JAX forward pass for 'fact'.
      protocol: 'molf_jax' (ours) or 'authors' (see :mod:`molf_jax.data._protocol`).

    Example:
      >>> from molf_jax.data import byte_level_tokenizer, load_task
      >>> records = load_task('med', size=4, seed=0).eval[:4]
      >>> always_a = lambda ids, mask: np.tile(np.array([36, 69], np.int32), (len(ids), 1))
      >>> evaluate_task('med', None, None, byte_level_tokenizer(), records,
      ...               batch_size=2, generate_fn=always_a)['accuracy']['n']
      4
    """
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; expected one of {TASKS}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if not records:
        raise ValueError(f"no records to evaluate for task {task_name!r}")
    if task_name == "fact":
        logits_fn = next_token_logits_fn or jax_next_token_logits_fn(model, params)
        return _evaluate_fact(records, tokenizer, logits_fn, batch_size, pad_to_multiple_of,
                              protocol)
    if generate_fn is None:
        budget = max_new_tokens or PROTOCOL_SETTINGS[protocol].max_new_tokens[task_name]
        generate_fn = jax_generate_fn(model, params, tokenizer, max_new_tokens=budget)
    return _evaluate_generation(
        task_name, records, tokenizer, generate_fn, batch_size, pad_to_multiple_of,
        sql_with_context, protocol,
    )

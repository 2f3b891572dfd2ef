"""The authors' CounterFact scoring, restated from their ``eval_fact.py`` (11785T23/molf).

What differs from ours (:mod:`molf_jax.eval._fact_metrics`):

* only the **first token** of ``" " + target`` is compared; when both targets start with the
  same token the probabilities are equal and the prompt counts as a failure (ours reads the
  first token where the targets differ, and skips a case whose target is a prefix of the other);
* prompts are stripped, the rewrite prompt filled with the stripped subject;
* the three scores are **flat means** over prompts (ours: per case, then over cases), x100;
* their model runs in bf16. Efficacy compares float32 softmax probabilities of the bf16 logits
  (their ``generate(output_scores=True)``); paraphrase and neighbourhood compare probabilities
  of a bf16 softmax (their plain forward pass), so near-equal pairs tie and fail. Here the
  logits are rounded to bf16 and the probabilities, for paraphrase and neighbourhood, too: the
  same rounding, though not a bf16 forward pass.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from molf_jax.data import authors_fact_prompt
from molf_jax.eval._fact_metrics import FactQuery

# Which queries use the bf16 softmax (their forward pass) rather than float32 scores.
_BF16_PROBABILITY_KINDS = ("paraphrase", "neighborhood")


def _first_token(tokenizer, target: str) -> int:
    ids = tokenizer(" " + str(target).strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return int(ids[0])


def authors_fact_queries(records: Sequence[Mapping[str, Any]], tokenizer) -> list[FactQuery]:
    """Every prompt the authors score, with the first token of each target (nothing skipped).

    Example:
      >>> from molf_jax.data import byte_level_tokenizer
      >>> rec = {'requested_rewrite': {'prompt': '{} speaks', 'subject': 'Ann ',
      ...        'target_new': {'str': 'English'}, 'target_true': {'str': 'French'}},
      ...        'paraphrase_prompts': [' Ann talks '], 'neighborhood_prompts': []}
      >>> [(q.kind, q.prompt, q.new_id == q.true_id) for q in
      ...  authors_fact_queries([rec], byte_level_tokenizer())]  # both start with ' ': a tie
      [('rewrite', 'Ann speaks', True), ('paraphrase', 'Ann talks', True)]
    """
    queries = []
    for case, record in enumerate(records):
        rewrite = record["requested_rewrite"]
        new_id = _first_token(tokenizer, rewrite["target_new"]["str"])
        true_id = _first_token(tokenizer, rewrite["target_true"]["str"])
        prompts = [("rewrite", authors_fact_prompt(rewrite["prompt"], rewrite["subject"]))]
        prompts += [("paraphrase", str(p).strip())
                    for p in record.get("paraphrase_prompts") or []]
        prompts += [("neighborhood", str(p).strip())
                    for p in record.get("neighborhood_prompts") or []]
        queries += [FactQuery(case, kind, prompt, (), new_id, true_id) for kind, prompt in prompts]
    return queries


def authors_probabilities(logits: np.ndarray, token_ids: np.ndarray, *, bf16_softmax: bool
                          ) -> np.ndarray:
    """Probabilities of ``token_ids`` [B, K] under softmax of bf16-rounded ``logits`` [B, V].

    With ``bf16_softmax`` the probabilities are rounded to bf16 as well (a bf16 softmax keeps
    float32 inside and rounds its output), which is where their ties come from.

    Example:
      >>> logits = np.array([[2.0, 2.001, -1.0]])
      >>> p = authors_probabilities(logits, np.array([[0, 1]]), bf16_softmax=True)
      >>> bool(p[0, 0] == p[0, 1])   # 2.0 and 2.001 are one bf16 value
      True
    """
    from jax.numpy import bfloat16

    rounded = np.asarray(logits, np.float32).astype(bfloat16).astype(np.float32)
    shifted = np.exp(rounded - rounded.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
    if bf16_softmax:
        probabilities = probabilities.astype(bfloat16).astype(np.float32)
    return np.take_along_axis(probabilities, np.asarray(token_ids), axis=-1)


def uses_bf16_softmax(query: FactQuery) -> bool:
    """Whether the authors score this query from a bf16 softmax (paraphrase, neighbourhood)."""
    return query.kind in _BF16_PROBABILITY_KINDS


def authors_fact_scores(queries: Sequence[FactQuery], p_new: np.ndarray, p_true: np.ndarray
                        ) -> dict:
    """Their efficacy, paraphrase and neighbourhood scores: flat means over prompts, x100.

    Success is strict (``p_new > p_true``; neighbourhood ``p_true > p_new``), so ties fail.

    Example:
      >>> q = [FactQuery(0, 'rewrite', 'p', (), 5, 5), FactQuery(1, 'rewrite', 'p', (), 5, 6)]
      >>> authors_fact_scores(q, np.array([0.3, 0.4]), np.array([0.3, 0.1]))[
      ...     'authors_efficacy_score']
      {'value': 50.0, 'n': 2}
    """
    hits: dict[str, list[bool]] = {"rewrite": [], "paraphrase": [], "neighborhood": []}
    for query, new, true in zip(queries, np.asarray(p_new), np.asarray(p_true)):
        hits[query.kind].append(bool(true > new if query.kind == "neighborhood" else new > true))
    names = {"rewrite": "efficacy", "paraphrase": "paraphrase", "neighborhood": "neighborhood"}
    return {
        f"authors_{names[kind]}_score": {
            "value": 100.0 * float(np.mean(values)) if values else 0.0, "n": len(values)}
        for kind, values in hits.items()
    }

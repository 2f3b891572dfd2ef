"""CounterFact scores from next-token probabilities of the first target token.

Definitions follow ROME (Meng et al., 2022, "Locating and Editing Factual Associations in GPT",
CounterFact section), computed on the first target token as the MoLF paper does:

* efficacy score: the rewrite prompt gives P(new) > P(true);
* paraphrase score: the fraction of a case's paraphrase prompts with P(new) > P(true);
* neighborhood score: the fraction of a case's neighbourhood prompts with P(true) > P(new)
  (the edit must not spill onto other subjects).

Each score is averaged per case, then over cases (ROME's summarisation); ``n`` counts cases.
Targets are tokenised with a leading space, as in ROME. "First target token" means the first
token where the two targets differ, read after the prompt plus their shared tokens: with real
tokenizers the targets differ at their first token (so this is exactly the paper's metric),
while a byte-level tokenizer, where both start with the space byte, still gets a meaningful
comparison. A case where one target's tokens are a prefix of the other's is skipped and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from molf_jax.data import fill_subject

KINDS = ("rewrite", "paraphrase", "neighborhood")


@dataclasses.dataclass(frozen=True)
class FactQuery:
    """One prompt to score.

    Attributes:
      case: index of the record.
      kind: 'rewrite', 'paraphrase' or 'neighborhood'.
      prompt: prompt text (tokenised with BOS as for generation).
      prefix: target tokens shared by both targets, appended after the prompt tokens.
      new_id: the new target's token at the first position where the targets differ.
      true_id: the true target's token at that position.
    """

    case: int
    kind: str
    prompt: str
    prefix: tuple[int, ...]
    new_id: int
    true_id: int


def target_tokens(tokenizer, target: str) -> list[int]:
    """Token ids of ``" " + target`` (no special tokens), as ROME tokenises targets.

    Example:
      >>> from molf_jax.data import byte_level_tokenizer
      >>> target_tokens(byte_level_tokenizer(), 'En')  # bytes + 4
      [36, 73, 114]
    """
    ids = tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} encodes to no tokens")
    return [int(i) for i in ids]


def distinguishing_tokens(new: Sequence[int], true: Sequence[int]):
    """(shared prefix, new token, true token) at the first position where two targets differ.

    Returns None when one target is a prefix of the other.

    Example:
      >>> distinguishing_tokens([5, 7, 9], [5, 8])
      ((5,), 7, 8)
    """
    for i, (a, b) in enumerate(zip(new, true)):
        if a != b:
            return tuple(new[:i]), a, b
    return None


def fact_queries(
    records: Sequence[Mapping[str, Any]], tokenizer
) -> tuple[list[FactQuery], int]:
    """Every prompt to score for CounterFact records; returns (queries, cases skipped).

    Example:
      >>> from molf_jax.data import byte_level_tokenizer, load_task
      >>> rec = load_task('fact', size=1, seed=0).eval[0]
      >>> queries, skipped = fact_queries([rec], byte_level_tokenizer())
      >>> [q.kind for q in queries][:3], queries[0].prefix, skipped  # prefix: the space byte
      (['rewrite', 'paraphrase', 'paraphrase'], (36,), 0)
    """
    queries, skipped = [], 0
    for case, record in enumerate(records):
        rewrite = record["requested_rewrite"]
        split = distinguishing_tokens(
            target_tokens(tokenizer, rewrite["target_new"]["str"]),
            target_tokens(tokenizer, rewrite["target_true"]["str"]),
        )
        if split is None:
            skipped += 1
            continue
        prefix, new_id, true_id = split
        prompts = {
            "rewrite": [fill_subject(rewrite["prompt"], rewrite["subject"])],
            "paraphrase": list(record.get("paraphrase_prompts") or []),
            "neighborhood": list(record.get("neighborhood_prompts") or []),
        }
        for kind in KINDS:
            for prompt in prompts[kind]:
                queries.append(FactQuery(case, kind, prompt, prefix, new_id, true_id))
    return queries, skipped


def fact_scores(
    queries: Sequence[FactQuery],
    new_logits: np.ndarray,
    true_logits: np.ndarray,
    *,
    num_cases: int,
    skipped: int,
) -> dict:
    """Efficacy, paraphrase and neighborhood scores from per-query logits of the two targets.

    Logits (or log-probabilities) of the same next-token distribution compare like
    probabilities, so P(new) > P(true) is ``new_logit > true_logit``; ties count as failures.

    Example:
      >>> q = [FactQuery(0, 'rewrite', 'p', (), 1, 2), FactQuery(0, 'neighborhood', 'n', (), 1, 2)]
      >>> s = fact_scores(q, np.array([2.0, 0.0]), np.array([1.0, 1.0]), num_cases=1, skipped=0)
      >>> s['efficacy_score'], s['neighborhood_score']
      ({'value': 1.0, 'n': 1}, {'value': 1.0, 'n': 1})
    """
    per_case: dict[str, dict[int, list[bool]]] = {k: {} for k in KINDS}
    for query, new, true in zip(queries, np.asarray(new_logits), np.asarray(true_logits)):
        success = new > true if query.kind != "neighborhood" else true > new
        per_case[query.kind].setdefault(query.case, []).append(bool(success))
    metrics = {}
    for kind in KINDS:
        case_means = [float(np.mean(v)) for v in per_case[kind].values()]
        metrics[f"{'efficacy' if kind == 'rewrite' else kind}_score"] = {
            "value": float(np.mean(case_means)) if case_means else 0.0,
            "n": len(case_means),
        }
    metrics["skipped_target_prefix"] = {"value": skipped, "n": num_cases}
    return metrics

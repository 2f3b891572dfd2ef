"""Per-case scores decided by one teacher-forced pass per batch instead of generation.

Greedy decoding writes a completion iff the model's argmax after each forced token is the next
token (:func:`molf_jax.eval.teacher_forced_argmax`), so "does the model write the gold answer,
then stop?" needs one forward pass per batch rather than one per new token. Two uses:

* :func:`med_text_correct_forced`: the offline Med task's answers, written as the option's text;
* :func:`retained_facts`: the forgetting probe (:func:`molf_jax.data.forgetting_probe`): which
  of the base model's known cloze facts a fine-tuned model still completes, by the criterion
  ``scripts/known_facts.py`` used to find them (:func:`known_by_forcing`).

Both decide on token ids: a model that spells the same text with other tokens (possible with a
subword tokenizer, never with a byte-level one) counts as wrong here.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Protocol, Sequence

from molf_jax.data import (
    answers_with_text,
    correct_option,
    med_prompt,
    pad_token_id,
    prompt_ids,
    target_ids,
)
from molf_jax.eval._teacher_forced import teacher_forced_argmax


class ClozeFact(Protocol):
    """What :func:`known_by_forcing` reads of a fact (``Candidate`` and ``ProbeFact`` have it)."""

    cloze: str
    completion: str
    answer: str


def answered(continuation: str, answer: str) -> bool:
    """Whether a greedy continuation gives ``answer`` as a whole word or number.

    Example:
      >>> answered(' 19\\n4 + 1', '19'), answered(' 190', '19'), answered(' Paris.', 'Paris')
      (True, False, True)
    """
    text = continuation.lstrip()
    return text.startswith(answer) and not re.match(r"\w", text[len(answer):len(answer) + 1])


def known_by_forcing(facts: Sequence[ClozeFact], model, params, tokenizer, *,
                     batch_size: int) -> list[bool]:
    """Whether greedy decoding from each fact's cloze writes its completion, then no further
    letter or digit (:func:`answered`); one forced pass per batch.

    Args:
      facts: items with ``cloze``, ``completion`` and ``answer``.
      model: a ``CausalLM``. params: its parameters. tokenizer: the model's tokenizer.
      batch_size: rows per forward pass.

    Example:
      >>> known_by_forcing(forgetting_probe(), model, params, tokenizer,
      ...                  batch_size=32)   # doctest: +SKIP
    """
    completions = [tokenizer(f.completion, add_special_tokens=False)["input_ids"] for f in facts]
    rows = teacher_forced_argmax(model, params, [prompt_ids(tokenizer, f.cloze) for f in facts],
                                 completions, pad_id=pad_token_id(tokenizer),
                                 batch_size=batch_size)
    return [list(row[:-1]) == list(ids)
            and answered(f.completion + tokenizer.decode(row[-1:], skip_special_tokens=True),
                         f.answer)
            for f, ids, row in zip(facts, completions, rows)]


def retained_facts(model, params: Any, tokenizer, probe: Sequence[ClozeFact], *,
                   batch_size: int = 32) -> list[int]:
    """1 for each probe fact the model still completes (as :func:`known_by_forcing` decides),
    else 0: the share of ones after fine-tuning is what the model retained of the probe.

    Example:
      >>> from molf_jax.data import forgetting_probe
      >>> kept = retained_facts(model, params, tokenizer, forgetting_probe(400),
      ...                       batch_size=32)   # doctest: +SKIP
      >>> sum(kept) / len(kept)   # doctest: +SKIP
      0.93
    """
    return [int(k) for k in known_by_forcing(probe, model, params, tokenizer,
                                             batch_size=batch_size)]


def _stops(tokenizer, token: int) -> bool:
    # What ends an answer for the text metric: EOS (generation stops) or a newline.
    eos = tokenizer.eos_token_id
    return (eos is not None and int(token) == int(eos)) or tokenizer.decode(
        [int(token)]).startswith("\n")


def med_text_correct_forced(model, params: Any, tokenizer,
                            records: Sequence[Mapping[str, Any]], *, batch_size: int = 32,
                            pad_to_multiple_of: int = 32) -> list[bool]:
    """Whether greedy decoding answers each offline Med record with its correct option's text.

    Correct iff, from the record's prompt (``med_prompt``, with BOS as the 'molf_jax'
    protocol evaluates it), greedy decoding writes exactly the gold completion's tokens
    (``" " + option text``, tokenised as training tokenises the target) and then EOS or a
    token whose text starts with a newline. That is the verdict of generating and scoring with
    :func:`molf_jax.eval.med_text_metrics` (answer cut at EOS or the first newline, stripped,
    equal to the option), except where generation writes the same text through other tokens,
    or spaces before the newline, or runs out of budget right after the answer.

    Args:
      model: a ``CausalLM``. params: its parameters. tokenizer: the model's tokenizer.
      records: offline Med records (``answer_style: 'option_text'``).
      batch_size: rows per forward pass.
      pad_to_multiple_of: sequence length rounding (one compilation per length bucket).

    Example:
      >>> from molf_jax.data import load_task
      >>> records = load_task('med', size=100, seed=0).eval[:400]
      >>> correct = med_text_correct_forced(model, params, tokenizer, records,
      ...                                   batch_size=32)   # doctest: +SKIP
    """
    lettered = sum(not answers_with_text(r) for r in records)
    if lettered:
        raise ValueError(f"{lettered} of {len(records)} Med records answer with a letter; "
                         "med_text_correct_forced scores answers written as the option's text")
    gold = [target_ids(tokenizer, " " + correct_option(r), add_eos=False) for r in records]
    rows = teacher_forced_argmax(model, params,
                                 [prompt_ids(tokenizer, med_prompt(r)) for r in records], gold,
                                 pad_id=pad_token_id(tokenizer), batch_size=batch_size,
                                 pad_to_multiple_of=pad_to_multiple_of)
    return [list(row[:-1]) == ids and _stops(tokenizer, row[-1])
            for ids, row in zip(gold, rows)]

"""Multiple-choice metrics: accuracy of the first option letter in the generation (MedMCQA), or
of the option's text (offline Med records, ``answer_style: 'option_text'``)."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

from molf_jax.data import OPTION_LETTERS, answers_with_text, correct_option, option_texts

# A capital A-D standing alone (not inside a word such as "DNA" or "Answer").
_LETTER = re.compile(r"(?<![A-Za-z])([ABCD])(?![A-Za-z])")


def first_option_letter(generation: str) -> str | None:
    """The first standalone option letter A-D in the generated text, or None.

    Example:
      >>> first_option_letter(' B. Leukopenia'), first_option_letter('The answer is (C)')
      ('B', 'C')
    """
    match = _LETTER.search(generation)
    return match.group(1) if match else None


def med_metrics(generations: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict:
    """Accuracy of the first option letter against each record's 0-based ``cop``.

    Records answered with the option's text (all or none of them) are scored by
    :func:`med_text_metrics` instead.

    Returns:
      ``{'accuracy': {'value', 'n'}, 'no_letter': {'value': count, 'n': total}}``; a
      generation without a letter counts as wrong.

    Example:
      >>> med_metrics([' A', ' C'], [{'cop': 0}, {'cop': 1}])['accuracy']
      {'value': 0.5, 'n': 2}
    """
    with_text = sum(answers_with_text(r) for r in records)
    if with_text:
        if with_text != len(records):
            raise ValueError(f"{with_text} of {len(records)} Med records answer with the "
                             "option's text (answer_style), the others with a letter; score "
                             "them apart")
        return med_text_metrics(generations, records)
    correct, no_letter, n = count_letters(generations, records, first_option_letter)
    return {
        "accuracy": {"value": correct / n if n else 0.0, "n": n},
        "no_letter": {"value": no_letter, "n": n},
    }


def count_letters(generations: Sequence[str], records: Sequence[Mapping[str, Any]],
                  letter_of: Callable[[str], str | None]) -> tuple[int, int, int]:
    """``(correct, without a letter, n)`` of the letters ``letter_of`` reads from each
    generation against each record's 0-based ``cop``.

    Example:
      >>> count_letters([' A', 'x'], [{'cop': 0}, {'cop': 1}], first_option_letter)
      (1, 1, 2)
    """
    if len(generations) != len(records):
        raise ValueError(f"{len(generations)} generations for {len(records)} records")
    letters = [letter_of(text) for text in generations]
    correct = sum(letter is not None and letter == OPTION_LETTERS[int(record["cop"])]
                  for letter, record in zip(letters, records))
    return correct, sum(letter is None for letter in letters), len(records)


def text_answer(generation: str) -> str:
    """The answer a generation gives: its text up to the first newline, stripped (the runner
    has already cut it at EOS).

    Example:
      >>> text_answer(' Buenos Aires\\nQuestion: ...')
      'Buenos Aires'
    """
    return generation.split("\n", 1)[0].strip()


def text_correct(generation: str, record: Mapping[str, Any]) -> bool:
    """Whether the generation's answer is exactly the correct option's text (case-sensitive).

    Example:
      >>> rec = {'opa': 'Lima', 'opb': 'Quito', 'opc': 'Oslo', 'opd': 'Rome', 'cop': 0}
      >>> text_correct(' Lima\\n', rec), text_correct(' lima', rec), text_correct(' Lima.', rec)
      (True, False, False)
    """
    return text_answer(generation) == correct_option(record)


def med_text_metrics(generations: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict:
    """Accuracy of answers written as the option's text, and how often the answer is an option.

    A generation is correct iff :func:`text_answer` equals the correct option's text exactly
    (case-sensitive). ``valid_option`` is the share of generations whose answer is one of the
    record's four options, right or wrong.

    Returns:
      ``{'accuracy': {'value', 'n'}, 'valid_option': {'value': share, 'n'}}``.

    Example:
      >>> rec = {'opa': 'Lima', 'opb': 'Quito', 'opc': 'Oslo', 'opd': 'Rome', 'cop': 0}
      >>> metrics = med_text_metrics([' Lima', ' Quito', ' Paris'], [rec] * 3)
      >>> metrics['accuracy']['value'], metrics['valid_option']
      (0.3333333333333333, {'value': 0.6666666666666666, 'n': 3})
    """
    if len(generations) != len(records):
        raise ValueError(f"{len(generations)} generations for {len(records)} records")
    n = len(records)
    answers = [text_answer(text) for text in generations]
    correct = sum(a == correct_option(r) for a, r in zip(answers, records))
    valid = sum(a in option_texts(r) for a, r in zip(answers, records))
    return {
        "accuracy": {"value": correct / n if n else 0.0, "n": n},
        "valid_option": {"value": valid / n if n else 0.0, "n": n},
    }

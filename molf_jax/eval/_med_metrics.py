"""Multiple-choice metric: accuracy of the first option letter in the generation."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

from molf_jax.data import OPTION_LETTERS

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

    Returns:
      ``{'accuracy': {'value', 'n'}, 'no_letter': {'value': count, 'n': total}}``; a
      generation without a letter counts as wrong.

    Example:
      >>> med_metrics([' A', ' C'], [{'cop': 0}, {'cop': 1}])['accuracy']
      {'value': 0.5, 'n': 2}
    """
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

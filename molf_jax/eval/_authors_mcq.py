"""The authors' MedMCQA scoring, restated from their ``eval_medmcqa.py`` (11785T23/molf).

Their extractor reads only the start of the stripped generation: one character A-D, or a
letter followed by ``)``, a newline or ``.`` (any case). Anything else, e.g. ``"(B)"``,
``"B is right"`` or ``"Answer: B"``, is an invalid answer and counts as wrong. Accuracy is
reported x100.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from molf_jax.data import OPTION_LETTERS
from molf_jax.eval._med_metrics import count_letters

_LETTER_THEN_MARK = re.compile(r"^([A-D])([\)\n\.])", re.IGNORECASE)


def authors_option_letter(generation: str) -> str | None:
    """The answer letter as the authors' extractor reads it, or None (an invalid answer).

    Example:
      >>> authors_option_letter(' b.'), authors_option_letter(' (B)'), authors_option_letter('C')
      ('B', None, 'C')
    """
    text = generation.strip()
    if len(text) == 1 and text.upper() in OPTION_LETTERS:
        return text.upper()
    match = _LETTER_THEN_MARK.match(text) if len(text) >= 2 else None
    return match.group(1).upper() if match else None


def authors_med_metrics(generations: Sequence[str], records: Sequence[Mapping[str, Any]]) -> dict:
    """Their accuracy (x100) and count of invalid answers.

    Example:
      >>> authors_med_metrics([' A', ' C x'], [{'cop': 0}, {'cop': 2}])['authors_accuracy']
      {'value': 50.0, 'n': 2}
    """
    correct, invalid, n = count_letters(generations, records, authors_option_letter)
    return {
        "authors_accuracy": {"value": 100.0 * correct / n if n else 0.0, "n": n},
        "authors_invalid_answers": {"value": invalid, "n": n},
    }

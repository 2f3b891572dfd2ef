"""Pronounceable invented names, so offline tasks ask about things no model has seen."""

from __future__ import annotations

import random

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "kr", "st", "tr", "th", "sh", "ch", "gl", "pl", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m")


def invented_name(rng: random.Random, *, syllables: int = 3, suffix: str = "") -> str:
    """A capitalised made-up word of ``syllables`` syllables, plus ``suffix``.

    Example:
      >>> invented_name(random.Random(0), syllables=2)
      'Veidux'
    """
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS) + suffix).capitalize()

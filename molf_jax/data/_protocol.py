"""Two ways to prepare and score the paper's tasks: the authors' code, quirks included, or ours.

``'authors'`` does what the MoLF authors' code does (11785T23/molf at 24f2c9f: ``src/data``,
``src/evaluation``; ``authors_protocol.md`` in the shared notes has the side-by-side), so a
number compares with the paper's: their prompt templates, EOS after every target, no BOS in
training but the tokenizer's own special tokens at evaluation (Gemma: ``<bos>``), no length
cap, random batches, their answer extractors and their scoring. ``'molf_jax'`` is ours: Alpaca's
template with the question as the instruction, BOS in training and evaluation, a 256-token cap,
length-grouped batches, and the corrected scoring of :mod:`molf_jax.eval`.

The default is ``'molf_jax'`` for every source: the authors' quirks (Gemma trained without
BOS, among others) matter only to a comparison with the paper, which asks for
``'authors'`` by name; a user's own file or hub dataset gets the library's own protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

AUTHORS = "authors"
MOLF_JAX = "molf_jax"
PROTOCOLS = (AUTHORS, MOLF_JAX)


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
    """What a protocol fixes besides its prompt text and its scoring.

    Attributes:
      train_bos: BOS before training sequences: None gives the tokenizer's BOS when it has one
        (ours); False never (theirs: ``encode(text, add_special_tokens=False)``).
      eval_special_tokens: evaluation prompts are tokenised with the tokenizer's own special
        tokens (theirs: ``tokenizer(prompts)``, which gives Gemma its ``<bos>``); otherwise BOS
        when the tokenizer has one (ours).
      max_length: length cap of training examples when none is given (None: no cap, theirs).
      bucket_batches: batches per length-sorting window (1: random batches, theirs).
      max_new_tokens: generation budget per task (theirs: SQL 1024, Med 256).
    """

    train_bos: bool | None
    eval_special_tokens: bool
    max_length: int | None
    bucket_batches: int
    max_new_tokens: Mapping[str, int]


SETTINGS = {
    AUTHORS: ProtocolSettings(train_bos=False, eval_special_tokens=True, max_length=None,
                              bucket_batches=1, max_new_tokens={"sql": 1024, "med": 256}),
    MOLF_JAX: ProtocolSettings(train_bos=None, eval_special_tokens=False, max_length=256,
                               bucket_batches=32, max_new_tokens={"sql": 256, "med": 8}),
}


def resolve_protocol(protocol: str | None) -> str:
    """The protocol to use: the one given, else 'molf_jax' (whatever the data's source).

    Example:
      >>> resolve_protocol(None), resolve_protocol('authors')
      ('molf_jax', 'authors')
    """
    if protocol is None:
        return MOLF_JAX
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    return protocol

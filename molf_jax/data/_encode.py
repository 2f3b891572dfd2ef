"""Tokenisation of rendered examples into token ids with a loss mask on the target.

Prompt and target are tokenised separately and concatenated (``[BOS] + prompt + target
[+ EOS]``), so the boundary between prompt and target is exact. Under the 'molf_jax' protocol a
training sequence starts with exactly the tokens that evaluation feeds to generation; under
'authors' training has no BOS while evaluation prompts get the tokenizer's special tokens
(:func:`eval_prompt_ids`), as their code does.

Examples longer than ``max_length`` are handled by ``overflow``:

* ``'drop'`` (default): the example is dropped; the count is logged and returned. A cut prompt
  would train on a question whose schema or options are missing.
* ``'truncate_left'``: prompt tokens are removed from the left (after BOS) until it fits; the
  count is logged. Examples whose target alone does not fit are still dropped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from molf_jax.data._prompts import Example
from molf_jax.data._protocol import MOLF_JAX, SETTINGS
from molf_jax.data._render import render_example

logger = logging.getLogger(__name__)

OVERFLOW_POLICIES = ("drop", "truncate_left")


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example and which of them are targets.

    Attributes:
      input_ids: int32 [L] token ids.
      loss_mask: int32 [L]; 1 where the token is a target (predicted from the previous token).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclasses.dataclass(frozen=True)
class EncodeStats:
    """How many examples were kept, truncated and dropped by :func:`encode_examples`."""

    kept: int
    truncated: int
    dropped: int


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token (Qwen base models).

    Example:
      >>> from molf_jax.data import byte_level_tokenizer
      >>> pad_token_id(byte_level_tokenizer()) == byte_level_tokenizer().pad_token_id
      True
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(tokenizer.eos_token_id)


def _bos(tokenizer, add_bos: bool | None) -> list[int]:
    if add_bos is False or tokenizer.bos_token_id is None:
        if add_bos:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        return []
    return [int(tokenizer.bos_token_id)]


def prompt_ids(tokenizer, prompt: str, *, add_bos: bool | None = None) -> list[int]:
    """Token ids of a prompt as the model sees it: BOS (if the tokenizer has one) + text.

    Example:
      >>> from molf_jax.data import byte_level_tokenizer
      >>> prompt_ids(byte_level_tokenizer(), 'Hi')
      [2, 76, 109]
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return _bos(tokenizer, add_bos) + list(ids)


def eval_prompt_ids(tokenizer, prompt: str, *, protocol: str = MOLF_JAX) -> list[int]:
    """Token ids of an evaluation prompt under ``protocol``.

    'molf_jax': as :func:`prompt_ids`. 'authors': ``tokenizer(prompt)`` with the tokenizer's own
    special tokens, as their evaluators call it, so Gemma gets ``<bos>`` although their
    training sequences have none; Qwen2.5 adds nothing either way.

    Example:
      >>> from molf_jax.data import byte_level_tokenizer
      >>> eval_prompt_ids(byte_level_tokenizer(), 'Hi', protocol='authors')  # adds no specials
      [76, 109]
    """
    if SETTINGS[protocol].eval_special_tokens:
        return [int(i) for i in tokenizer(prompt)["input_ids"]]
    return prompt_ids(tokenizer, prompt)


def target_ids(tokenizer, target: str, *, add_eos: bool) -> list[int]:
    """Token ids of a target, followed by EOS when ``add_eos``."""
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("the target needs EOS but the tokenizer has no eos_token_id")
        ids.append(int(tokenizer.eos_token_id))
    return ids


def encode_example(
    tokenizer,
    example: Example,
    *,
    max_length: int | None = None,
    overflow: str = "drop",
    add_bos: bool | None = None,
) -> tuple[EncodedExample | None, bool]:
    """Encodes one example; returns (encoded or None if dropped, whether it was truncated).

    Example:
      >>> from molf_jax.data import Example, byte_level_tokenizer
      >>> enc, cut = encode_example(byte_level_tokenizer(), Example('Q', ' A', add_eos=True))
      >>> enc.input_ids.tolist(), enc.loss_mask.tolist(), cut
      ([2, 85, 36, 69, 1], [0, 0, 1, 1, 1], False)
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    prompt = prompt_ids(tokenizer, example.prompt, add_bos=add_bos)
    target = target_ids(tokenizer, example.target, add_eos=example.add_eos)
    if not target:
        raise ValueError(f"target {example.target!r} encodes to no tokens")
    truncated = False
    if max_length is not None and len(prompt) + len(target) > max_length:
        n_bos = len(_bos(tokenizer, add_bos))
        room = max_length - len(target) - n_bos
        if overflow == "drop" or room < 1:
            return None, False
        prompt = prompt[:n_bos] + prompt[len(prompt) - room :]
        truncated = True
    ids = np.asarray(prompt + target, dtype=np.int32)
    mask = np.zeros_like(ids)
    mask[len(prompt) :] = 1
    return EncodedExample(input_ids=ids, loss_mask=mask), truncated


def encode_examples(
    tokenizer,
    examples: Iterable[Example],
    *,
    max_length: int | None = None,
    overflow: str = "drop",
    add_bos: bool | None = None,
) -> tuple[list[EncodedExample], EncodeStats]:
    """Encodes many examples; logs and returns how many were truncated or dropped.

    Example:
      >>> from molf_jax.data import Example, byte_level_tokenizer
      >>> encoded, stats = encode_examples(byte_level_tokenizer(), [Example('Q', ' A', False)])
      >>> len(encoded), stats.dropped
      (1, 0)
    """
    encoded, truncated, dropped = [], 0, 0
    for example in examples:
        enc, cut = encode_example(
            tokenizer, example, max_length=max_length, overflow=overflow, add_bos=add_bos
        )
        if enc is None:
            dropped += 1
            continue
        truncated += cut
        encoded.append(enc)
    stats = EncodeStats(kept=len(encoded), truncated=truncated, dropped=dropped)
    if dropped:
        logger.warning(
            "dropped %d of %d examples longer than max_length=%s", dropped,
            dropped + len(encoded), max_length,
        )
    if truncated:
        logger.warning(
            "truncated the prompt of %d of %d examples from the left to max_length=%s",
            truncated, dropped + len(encoded), max_length,
        )
    return encoded, stats


def encode_records(
    task: str,
    records: Sequence[Mapping[str, Any]],
    tokenizer,
    *,
    max_length: int | None = None,
    overflow: str = "drop",
    sql_with_context: bool = True,
    add_bos: bool | None = None,
    protocol: str = MOLF_JAX,
) -> tuple[list[EncodedExample], EncodeStats]:
    """Renders and encodes the training examples of ``task`` records under ``protocol``.

    ``add_bos`` defaults to the protocol's (the tokenizer's BOS for 'molf_jax', none for
    'authors'); ``max_length`` is applied as given (None: no cap).

    Example:
      >>> from molf_jax.data import byte_level_tokenizer, load_task
      >>> data = load_task('fact', size=4, seed=0)
      >>> encoded, stats = encode_records('fact', data.train, byte_level_tokenizer())
      >>> stats.kept
      8
    """
    examples = (render_example(task, r, sql_with_context=sql_with_context, protocol=protocol)
                for r in records)
    if add_bos is None:
        add_bos = SETTINGS[protocol].train_bos
    return encode_examples(
        tokenizer, examples, max_length=max_length, overflow=overflow, add_bos=add_bos
    )

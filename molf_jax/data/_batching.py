"""Length-bucketed, right-padded training batches with a resumable position.

Each epoch's order is a pure function of (seed, epoch): shuffle all examples, cut the order into
windows of ``bucket_batches`` batches, sort each window by length (so a batch holds examples of
similar length and little padding), cut into batches, and shuffle the batches. The iterator's
position is ``{'epoch', 'index'}`` (plus what it was built from, checked on restore), so a run
that saves ``iterator.state()`` with its checkpoint resumes at exactly the next batch.

The last batch of an epoch is filled up to ``batch_size`` with examples from the start of the
epoch's order whose ``loss_mask`` is zeroed: shapes stay fixed (one jit compilation per
length bucket) and no example is dropped or counted twice in the loss.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Sequence

import numpy as np

from molf_jax.data._encode import EncodedExample

Batch = dict[str, np.ndarray]


def pad_right(
    rows: Sequence[EncodedExample],
    *,
    pad_id: int,
    length: int,
    targets: Sequence[bool] | None = None,
) -> Batch:
    """Right-pads examples to ``length`` into the shared batch format (int32 numpy arrays).

    Args:
      rows: encoded examples, each at most ``length`` tokens.
      pad_id: token id written into padding positions.
      length: padded sequence length T.
      targets: per row, whether its loss mask is kept (False zeroes it: filler rows).

    Returns:
      ``{'input_ids', 'attention_mask', 'loss_mask'}``, each int32 [B, T].

    Example:
      >>> import numpy as np
      >>> ex = EncodedExample(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.int32))
      >>> pad_right([ex], pad_id=0, length=4)['attention_mask'].tolist()
      [[1, 1, 1, 0]]
    """
    batch = {
        "input_ids": np.full((len(rows), length), pad_id, dtype=np.int32),
        "attention_mask": np.zeros((len(rows), length), dtype=np.int32),
        "loss_mask": np.zeros((len(rows), length), dtype=np.int32),
    }
    for b, row in enumerate(rows):
        n = len(row)
        if n > length:
            raise ValueError(f"example of {n} tokens does not fit in a batch of length {length}")
        batch["input_ids"][b, :n] = row.input_ids
        batch["attention_mask"][b, :n] = 1
        if targets is None or targets[b]:
            batch["loss_mask"][b, :n] = row.loss_mask
    return batch


def fixed_lengths(max_length: int, count: int = 4, multiple: int = 32) -> tuple[int, ...]:
    """``count`` padded lengths for batches of examples up to ``max_length`` tokens: halvings
    of ``max_length`` rounded up to ``multiple``, so a training run compiles its step at most
    ``count`` times (one per length) and pads a batch to at most twice its longest example.

    Example:
      >>> fixed_lengths(512)
      (64, 128, 256, 512)
      >>> fixed_lengths(100)
      (32, 64, 100)
    """
    lengths = {max_length}
    for k in range(1, count):
        lengths.add(max(multiple, -(-(max_length >> k) // multiple) * multiple))
    return tuple(sorted(n for n in lengths if n <= max_length))


def loss_token_budget(examples: Sequence[EncodedExample], rows: int,
                      multiple: int = 64) -> int:
    """An upper bound on the target tokens of any batch of ``rows`` of ``examples``: the
    ``rows`` largest per-example target counts summed, rounded up to ``multiple``. The loss
    can then run the output head on that many gathered positions alone
    (`molf_jax.models.next_token_loss_sum`'s ``loss_tokens``), whatever the batch.

    A target is a position t >= 1 with ``loss_mask[t]`` set (it is predicted from t - 1).

    Example:
      >>> import numpy as np
      >>> ex = [EncodedExample(np.zeros(n, np.int32), np.r_[np.zeros(n - k), np.ones(k)])
      ...       for n, k in ((10, 3), (12, 7), (9, 1))]
      >>> loss_token_budget(ex, rows=2, multiple=4)   # 7 + 3, rounded up
      12
    """
    counts = sorted((int(np.asarray(e.loss_mask[1:]).sum()) for e in examples), reverse=True)
    total = max(1, sum(counts[:rows]))
    return -(-total // multiple) * multiple


class BatchIterator:
    """Yields training batches over epochs; resumable through :meth:`state`/:meth:`restore`.

    Args:
      examples: encoded examples (see :func:`molf_jax.data.encode_records`).
      batch_size: rows per batch.
      pad_id: padding token id (``tokenizer.pad_token_id``).
      seed: seed of the shuffles; epoch ``e`` uses ``(seed, e)``.
      shuffle: shuffle examples and batches each epoch (False: source order, still bucketed).
      num_epochs: stop after this many epochs (None: never stop).
      bucket_batches: batches per length-sorting window (None or 1: no length bucketing).
      pad_to_multiple_of: round each batch's length up to a multiple of this, so the number of
        distinct shapes (and jit compilations) stays small.
      lengths: if given, the only padded lengths batches take (each pads to the shortest one
        that holds its longest example; see `fixed_lengths`), overriding ``pad_to_multiple_of``.
      max_length: cap on the padded length (examples must already fit).
      state: a position from :meth:`state` to start from.

    Example:
      >>> import numpy as np
      >>> ex = [EncodedExample(np.arange(n, dtype=np.int32) + 4, np.ones(n, np.int32))
      ...       for n in (3, 5, 4)]
      >>> it = BatchIterator(ex, batch_size=2, pad_id=0, seed=0, pad_to_multiple_of=8)
      >>> batch = next(it)
      >>> batch['input_ids'].shape, it.state()['index']
      ((2, 8), 1)
    """

    def __init__(
        self,
        examples: Sequence[EncodedExample],
        *,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        num_epochs: int | None = None,
        bucket_batches: int | None = 32,
        pad_to_multiple_of: int = 32,
        max_length: int | None = None,
        lengths: Sequence[int] | None = None,
        state: dict[str, Any] | None = None,
    ):
        if not examples:
            raise ValueError("BatchIterator needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._examples = list(examples)
        self._lengths = [len(e) for e in self._examples]
        if max_length is not None and max(self._lengths) > max_length:
            raise ValueError(
                f"an example has {max(self._lengths)} tokens, more than max_length={max_length}"
            )
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.bucket_batches = bucket_batches or 1
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.lengths = sorted(lengths) if lengths else None
        if self.lengths and max(self._lengths) > self.lengths[-1]:
            raise ValueError(f"an example has {max(self._lengths)} tokens, more than the longest "
                             f"batch length {self.lengths[-1]}")
        self._epoch, self._index = 0, 0
        self._plan_epoch, self._plan = -1, []
        if state is not None:
            self.restore(state)

    @property
    def steps_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        return math.ceil(len(self._examples) / self.batch_size)

    def state(self) -> dict[str, Any]:
        """The position of the next batch, as a small JSON-serialisable dict."""
        return {
            "epoch": self._epoch,
            "index": self._index,
            "seed": self.seed,
            "num_examples": len(self._examples),
            "batch_size": self.batch_size,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Moves to a position returned by :meth:`state` (checked against this iterator)."""
        mine = self.state()
        for key in ("seed", "num_examples", "batch_size"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"iterator state has {key}={state[key]}, this iterator has {mine[key]}"
                )
        index = int(state["index"])
        if not 0 <= index <= self.steps_per_epoch:
            raise ValueError(f"iterator state index {index} is outside 0..{self.steps_per_epoch}")
        self._epoch, self._index = int(state["epoch"]), index
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0

    def epoch_plan(self, epoch: int) -> list[tuple[list[int], int]]:
        """The batches of ``epoch``: (example indices, number of real rows) per batch."""
        n, size = len(self._examples), self.batch_size
        rng = random.Random(f"molf-batches-{self.seed}-{epoch}")
        order = list(range(n))
        if self.shuffle:
            rng.shuffle(order)
        window = size * self.bucket_batches
        batches: list[tuple[list[int], int]] = []
        for start in range(0, n, window):
            chunk = sorted(order[start : start + window], key=self._lengths.__getitem__)
            for b in range(0, len(chunk), size):
                rows = chunk[b : b + size]
                real = len(rows)
                rows += [order[j % n] for j in range(size - real)]
                batches.append((rows, real))
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _batch(self, rows: list[int], real: int) -> Batch:
        longest = max(self._lengths[i] for i in rows)
        if self.lengths:
            length = next(n for n in self.lengths if n >= longest)
        else:
            m = self.pad_to_multiple_of
            length = -(-longest // m) * m
            if self.max_length is not None:
                length = min(length, self.max_length)
        return pad_right(
            [self._examples[i] for i in rows],
            pad_id=self.pad_id,
            length=length,
            targets=[k < real for k in range(len(rows))],
        )

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        if self._plan_epoch != self._epoch:
            self._plan, self._plan_epoch = self.epoch_plan(self._epoch), self._epoch
        rows, real = self._plan[self._index]
        self._index += 1
        if self._index == len(self._plan):
            self._epoch, self._index = self._epoch + 1, 0
        return self._batch(rows, real)

"""Tokenisation with loss masks, overflow policy, bucketed batches and exact resumption."""

import logging

import numpy as np
import pytest

from molf_jax.data import (
    BatchIterator,
    EncodedExample,
    Example,
    byte_level_tokenizer,
    encode_example,
    encode_examples,
    encode_records,
    fixed_lengths,
    load_task,
    render_example,
)

TOK = byte_level_tokenizer()
BOS, EOS, PAD = TOK.bos_token_id, TOK.eos_token_id, TOK.pad_token_id


def _bytes(text):
    return [b + 4 for b in text.encode()]  # the byte tokenizer's ids


def test_byte_tokenizer_round_trips_any_text():
    text = "SELECT name FROM t WHERE city = 'Zürich';\n\tÅ"
    ids = TOK(text, add_special_tokens=False)["input_ids"]
    assert ids == _bytes(text)
    assert TOK.decode(ids) == text


def test_encoding_masks_the_prompt_and_appends_eos_only_where_asked():
    enc, cut = encode_example(TOK, Example("Q:", " SELECT 1;", add_eos=True))
    assert enc.input_ids.tolist() == [BOS] + _bytes("Q:") + _bytes(" SELECT 1;") + [EOS]
    assert enc.loss_mask.tolist() == [0, 0, 0] + [1] * 10 + [1]
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.int32 and not cut
    enc, _ = encode_example(TOK, Example("Answer:", " B", add_eos=False))
    assert enc.input_ids.tolist()[-2:] == _bytes(" B")
    assert enc.loss_mask.sum() == 2


def test_encoded_training_text_is_prompt_then_target_of_each_task():
    for task in ("sql", "med", "fact"):
        record = load_task(task, "offline", size=5, seed=0).train[0]
        example = render_example(task, record)
        (enc,), stats = encode_records(task, [record], TOK)
        target = enc.input_ids[enc.loss_mask == 1].tolist()
        # SQL and the offline Med (the option's text) end with EOS; a fact target does not.
        expected = _bytes(example.target) + ([EOS] if task in ("sql", "med") else [])
        assert target == expected
        assert TOK.decode(enc.input_ids[1:][enc.loss_mask[1:] == 0]) == example.prompt
        assert stats.kept == 1


def test_overflow_drop_counts_and_logs(caplog):
    examples = [Example("x" * n, " y", add_eos=True) for n in (3, 20, 5, 40)]
    with caplog.at_level(logging.WARNING, logger="molf_jax.data"):
        encoded, stats = encode_examples(TOK, examples, max_length=10)
    assert [len(e) for e in encoded] == [7, 9]
    assert (stats.kept, stats.dropped, stats.truncated) == (2, 2, 0)
    assert "dropped 2 of 4 examples longer than max_length=10" in caplog.text


def test_overflow_truncate_left_keeps_bos_and_target(caplog):
    examples = [Example("abcdefghij", " y", add_eos=True), Example("a", "z" * 12, add_eos=False)]
    with caplog.at_level(logging.WARNING, logger="molf_jax.data"):
        encoded, stats = encode_examples(TOK, examples, max_length=8, overflow="truncate_left")
    (enc,) = encoded
    assert enc.input_ids.tolist() == [BOS] + _bytes("ghij") + _bytes(" y") + [EOS]
    assert enc.loss_mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert (stats.truncated, stats.dropped) == (1, 1)  # a target longer than 8 cannot fit
    assert "truncated the prompt of 1 of 2 examples" in caplog.text


def _examples(lengths):
    out = []
    for i, n in enumerate(lengths):
        ids = np.full(n, 10 + i, dtype=np.int32)  # token = 10 + example index
        mask = np.zeros(n, dtype=np.int32)
        mask[n // 2 :] = 1
        out.append(EncodedExample(ids, mask))
    return out


def _rows_of(batch):
    """Example index of each real (loss-carrying) row."""
    has_loss = batch["loss_mask"].sum(1) > 0
    return [int(r[0]) - 10 for r, keep in zip(batch["input_ids"], has_loss) if keep]


def test_batches_follow_the_shared_contract():
    it = BatchIterator(_examples([3, 9, 5]), batch_size=2, pad_id=PAD, seed=0,
                       pad_to_multiple_of=4, num_epochs=1)
    batches = list(it)
    assert len(batches) == it.steps_per_epoch == 2
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
        assert all(v.dtype == np.int32 and v.shape == (2, batch["input_ids"].shape[1])
                   for v in batch.values())
        assert batch["input_ids"].shape[1] % 4 == 0
        # Right padding: ones then zeros; padding carries pad_id and no loss.
        for row_ids, row_mask, row_loss in zip(*batch.values()):
            n = int(row_mask.sum())
            assert row_mask[:n].all() and not row_mask[n:].any()
            assert (row_ids[n:] == PAD).all() and not row_loss[n:].any()


def test_an_epoch_trains_on_every_example_exactly_once():
    lengths = list(np.random.RandomState(0).randint(2, 30, size=23))
    it = BatchIterator(_examples(lengths), batch_size=4, pad_id=PAD, seed=1, num_epochs=1,
                       bucket_batches=2)
    seen = [i for batch in it for i in _rows_of(batch)]
    assert sorted(seen) == list(range(23))
    # 23 = 5 full batches + 3 rows; the filler row keeps the batch shape but has no loss.


def test_bucketing_reduces_padding():
    lengths = list(np.random.RandomState(0).randint(2, 200, size=256))
    def padded_tokens(bucket):
        it = BatchIterator(_examples(lengths), batch_size=8, pad_id=PAD, seed=0, num_epochs=1,
                           bucket_batches=bucket, pad_to_multiple_of=1)
        return sum(b["input_ids"].size for b in it)
    assert padded_tokens(16) < 0.75 * padded_tokens(None)


def test_shuffle_is_deterministic_by_seed_and_epoch():
    ex = _examples(list(range(2, 42)))
    order = lambda seed, epoch: [i for rows, _ in BatchIterator(  # noqa: E731
        ex, batch_size=4, pad_id=PAD, seed=seed).epoch_plan(epoch) for i in rows]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)


def test_resume_from_state_yields_exactly_the_remaining_batches():
    ex = _examples(list(np.random.RandomState(2).randint(2, 50, size=30)))
    kwargs = dict(batch_size=4, pad_id=PAD, seed=5, num_epochs=3, bucket_batches=3)
    reference = list(BatchIterator(ex, **kwargs))
    it = BatchIterator(ex, **kwargs)
    for _ in range(10):  # into the second epoch (8 batches per epoch)
        next(it)
    state = it.state()
    assert state["epoch"] == 1 and state["index"] == 2
    resumed = list(BatchIterator(ex, **kwargs, state=state))
    assert len(resumed) == len(reference) - 10
    for a, b in zip(resumed, reference[10:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    restored = BatchIterator(ex, **kwargs)
    restored.restore(state)
    np.testing.assert_array_equal(next(restored)["input_ids"], resumed[0]["input_ids"])


def test_restore_rejects_a_state_from_another_setup():
    it = BatchIterator(_examples([3, 4, 5]), batch_size=2, pad_id=PAD, seed=0)
    with pytest.raises(ValueError, match="seed=1"):
        it.restore({"epoch": 0, "index": 1, "seed": 1, "num_examples": 3, "batch_size": 2})
    with pytest.raises(ValueError, match="num_examples=9"):
        it.restore({"epoch": 0, "index": 1, "seed": 0, "num_examples": 9, "batch_size": 2})


def test_fixed_lengths_bound_the_batch_shapes():
    assert fixed_lengths(512) == (64, 128, 256, 512)
    rng = np.random.default_rng(0)
    examples = [EncodedExample(np.full(n, 7, np.int32), np.ones(n, np.int32))
                for n in rng.integers(5, 512, 300)]
    it = BatchIterator(examples, batch_size=4, pad_id=PAD, seed=0, num_epochs=1,
                       lengths=fixed_lengths(512))
    shapes = set()
    for batch in it:
        length = batch["input_ids"].shape[1]
        longest = int(batch["attention_mask"].sum(1).max())
        # the shortest allowed length that holds the batch's longest row
        assert length == min(n for n in (64, 128, 256, 512) if n >= longest)
        shapes.add(length)
    assert shapes == {64, 128, 256, 512}
    with pytest.raises(ValueError, match="more than the longest batch length 64"):
        BatchIterator(examples, batch_size=4, pad_id=PAD, lengths=(32, 64))

"""The output head on gathered target positions (``loss_tokens``): the same loss and gradients
as the head on every position, and a budget no batch exceeds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molf_jax.data import BatchIterator, EncodedExample, loss_token_budget
from molf_jax.models.loss import next_token_loss_sum


def _case():
    k = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(k[0], (3, 10, 8))
    kernel = jax.random.normal(k[1], (8, 50))
    ids = jax.random.randint(k[2], (3, 10), 0, 50)
    mask = np.zeros((3, 10), np.int32)
    mask[0, 5:8] = 1
    mask[1, 2:4] = 1
    mask[2, 9] = 1
    mask[2, 0] = 1  # position 0 is never a target (nothing predicts it)
    return hidden, kernel, ids, mask


@pytest.mark.parametrize("budget", [6, 8, 27])
def test_gathered_targets_give_the_loss_and_gradients_of_every_position(budget):
    hidden, kernel, ids, mask = _case()

    def loss(h, w, tokens):
        return next_token_loss_sum(h, w, ids, mask, chunk=4, softcap=3.0, loss_tokens=tokens)

    total, count = loss(hidden, kernel, None)
    got, got_count = loss(hidden, kernel, budget)
    assert float(count) == float(got_count) == 6.0
    np.testing.assert_allclose(got, total, rtol=1e-6)
    want = jax.grad(lambda h, w: loss(h, w, None)[0], argnums=(0, 1))(hidden, kernel)
    have = jax.grad(lambda h, w: loss(h, w, budget)[0], argnums=(0, 1))(hidden, kernel)
    for a, b in zip(want, have):
        np.testing.assert_allclose(b, a, atol=1e-5)
    # Vmapped (a sweep's members) as alone.
    stacked = jax.vmap(lambda h: loss(h, kernel, budget)[0])(jnp.stack([hidden, 2 * hidden]))
    np.testing.assert_allclose(stacked[1], loss(2 * hidden, kernel, None)[0], rtol=1e-6)


def test_a_budget_below_the_targets_loses_them():
    """The caller's bound matters: with fewer slots than targets, the rest are not counted."""
    hidden, kernel, ids, mask = _case()
    total, _ = next_token_loss_sum(hidden, kernel, ids, mask, chunk=4, loss_tokens=5)
    full, _ = next_token_loss_sum(hidden, kernel, ids, mask, chunk=4)
    assert float(total) < float(full)


def test_the_budget_bounds_the_targets_of_every_batch():
    rng = np.random.default_rng(0)
    examples = []
    for _ in range(40):
        n, k = int(rng.integers(4, 30)), int(rng.integers(1, 4))
        examples.append(EncodedExample(np.arange(n, dtype=np.int32),
                                       np.r_[np.zeros(n - k), np.ones(k)].astype(np.int32)))
    budget = loss_token_budget(examples, rows=8, multiple=1)
    largest = sorted((int(e.loss_mask[1:].sum()) for e in examples), reverse=True)
    assert budget == sum(largest[:8])
    iterator = BatchIterator(examples, batch_size=8, pad_id=0, seed=3, num_epochs=5)
    counts = [int(b["loss_mask"][:, 1:].sum()) for b in iterator]
    assert max(counts) <= budget and len(counts) == 25
    assert loss_token_budget(examples, rows=8) % 64 == 0

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


def test_a_vocab_major_head_gives_the_same_loss_and_gradients():
    """A tied embedding [V, D] as the head gives what its transpose gives."""
    hidden, kernel, ids, mask = _case()

    def loss(h, w, vocab_major):
        return next_token_loss_sum(h, w, ids, mask, chunk=4, softcap=3.0, loss_tokens=8,
                                   vocab_major=vocab_major)[0]

    want = jax.value_and_grad(lambda h, w: loss(h, w, False), argnums=(0, 1))(hidden, kernel)
    got = jax.value_and_grad(lambda h, w: loss(h, w.T, True), argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(want[1], got[1]):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_the_tied_heads_gradient_keeps_the_embeddings_layout():
    """No [D, V] array in the gradient of a tied model's loss: XLA kept such an accumulated
    gradient and fused its transpose into the embedding's optimizer update (27 of 92 ms of a
    molf step on the GPU)."""
    from molf_jax.models import Qwen2Config, build_model, init_params, next_token_loss

    config = Qwen2Config(vocab_size=96, hidden_size=16, intermediate_size=32, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True)
    model = build_model(config)
    params = init_params(model, jax.random.key(0))
    ids = jnp.ones((2, 8), jnp.int32)
    grad = jax.grad(lambda p: next_token_loss(model, p, ids, ids, ids, chunk=4)[0])
    jaxpr = str(jax.make_jaxpr(grad)(params))
    assert "f32[96,16]" in jaxpr
    assert "f32[16,96]" not in jaxpr

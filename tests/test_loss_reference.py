"""The chunked next-token loss against a plain NumPy float64 cross-entropy, and the model's own
loss (head, tied embeddings, soft-cap) against cross-entropy on its logits.

Batches carry right and left padding and a loss mask narrower than the attention mask; chunk
sizes from one token to more than the whole batch, most of them not dividing the number of
predicted positions, so the scan runs over several chunks and a padded last one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny_hf import gemma3_config, padded_batch, qwen2_config

from molf_jax import models
from molf_jax.models import next_token_loss_sum

B, T, D, V = 3, 11, 8, 13  # B * (T - 1) = 30 predicted positions


def masked_batch(seed=0):
    """ids, attention mask (row 1 right-padded, row 2 left-padded) and a loss mask that also
    leaves out each row's prompt (its first real tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    attention = np.ones((B, T), np.int32)
    attention[1, -4:] = 0
    attention[2, :3] = 0
    loss_mask = attention.copy()
    loss_mask[0, :5] = 0
    loss_mask[1, :2] = 0
    loss_mask[2, :6] = 0
    return ids, attention, loss_mask


def numpy_loss(hidden, kernel, ids, loss_mask, softcap=None):
    """Sum over target tokens of -log p(token t+1 | position t), float64, and the gradients of
    that sum with respect to hidden and kernel."""
    h = np.asarray(hidden, np.float64)
    w = np.asarray(kernel, np.float64)
    z = np.einsum("btd,dv->btv", h, w)
    logits = softcap * np.tanh(z / softcap) if softcap else z
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    targets, weights = ids[:, 1:], loss_mask[:, 1:].astype(np.float64)
    picked = np.take_along_axis(log_probs[:, :-1], targets[..., None], -1)[..., 0]
    total = -(picked * weights).sum()

    d_logits = np.exp(log_probs[:, :-1])
    np.put_along_axis(d_logits, targets[..., None],
                      np.take_along_axis(d_logits, targets[..., None], -1) - 1, -1)
    d_logits *= weights[..., None]
    d_z = d_logits * (1 - np.tanh(z[:, :-1] / softcap) ** 2) if softcap else d_logits
    d_hidden = np.zeros_like(h)
    d_hidden[:, :-1] = np.einsum("btv,dv->btd", d_z, w)
    d_kernel = np.einsum("btd,btv->dv", h[:, :-1], d_z)
    return total, weights.sum(), d_hidden, d_kernel


def random_inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)), dtype)
    kernel = jnp.asarray(rng.normal(size=(D, V)), dtype)
    return hidden, kernel


# bf16 inputs: the reference sees the same bf16 values. Products are exact in float32 and the
# loss sums in float32, so the loss stays near float32 rounding; the gradients come back in
# bf16 (8 significant bits).
TOLERANCES = {"float32": dict(loss=1e-5, grad=1e-5), "bfloat16": dict(loss=1e-4, grad=1e-2)}


# Chunks of 4 and 7 tokens make 8 and 5 chunks (both with a padded tail), 1024 makes one.
@pytest.mark.parametrize("dtype,softcap,chunks", [("float32", None, (4, 7, 1024)),
                                                  ("float32", 3.0, (7,)),
                                                  ("bfloat16", 3.0, (7,))],
                         ids=["float32", "float32-softcap", "bfloat16-softcap"])
def test_loss_and_gradients_equal_numpy_cross_entropy_for_any_chunk(dtype, softcap, chunks):
    tol = TOLERANCES[dtype]
    ids, _, loss_mask = masked_batch()
    hidden, kernel = random_inputs(dtype)
    total, count, d_hidden, d_kernel = numpy_loss(hidden.astype(jnp.float32),
                                                  kernel.astype(jnp.float32), ids, loss_mask,
                                                  softcap)
    assert count == 16  # of 30 predicted positions

    def loss(hidden, kernel, chunk):
        return next_token_loss_sum(hidden, kernel, ids, loss_mask, chunk=chunk, softcap=softcap)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    for chunk in chunks:
        (got_total, got_count), (got_hidden, got_kernel) = step(hidden, kernel, chunk)
        assert got_total.dtype == jnp.float32 and float(got_count) == count, chunk
        np.testing.assert_allclose(float(got_total), total, rtol=tol["loss"],
                                   err_msg=f"chunk {chunk}")
        for got, want, name in ((got_kernel, d_kernel, "kernel"), (got_hidden, d_hidden,
                                                                    "hidden")):
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol["grad"],
                                       atol=tol["grad"] * np.abs(want).max(),
                                       err_msg=f"{name} gradient, chunk {chunk}")


@pytest.mark.parametrize("family", ["qwen2-untied", "gemma3-tied-softcap"])
def test_next_token_loss_is_the_cross_entropy_of_the_models_logits(family):
    if family.startswith("qwen2"):
        config = models.Qwen2Config.from_hf(qwen2_config().to_dict())
    else:
        config = models.Gemma3Config.from_hf(gemma3_config(final_logit_softcapping=3.0).to_dict())
        assert config.tie_word_embeddings and config.final_logit_softcapping == 3.0
    model = models.build_model(config)
    params = models.init_params(model, jax.random.key(0))
    if config.final_logit_softcapping:
        # A random tiny model's logits stay far below a cap of 3 (|z| < 0.6), where the cap is
        # nearly the identity; a larger final norm scale pushes them past it.
        params["norm"]["scale"] = params["norm"]["scale"] + 30.0
    ids, mask = (x.astype(np.int32) for x in padded_batch())
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0  # a prompt: its tokens are not targets

    total, count = models.next_token_loss(model, params, ids, mask, loss_mask, chunk=5)

    logits = model.apply({"params": params}, ids, mask)
    if config.final_logit_softcapping:
        # The forward pass caps: every logit within 3, many close to it.
        assert np.abs(logits).max() <= 3.0 and np.mean(np.abs(logits) > 2.5) > 0.3
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    weights = loss_mask[:, 1:]
    assert float(count) == weights.sum()
    np.testing.assert_allclose(float(total), float((per_token * weights).sum()), rtol=1e-5)

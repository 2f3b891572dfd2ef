"""teacher_forced_argmax decides what greedy decoding writes, without generating."""

import jax
import numpy as np
import pytest

from molf_jax import models
from molf_jax.eval import left_pad, teacher_forced_argmax
from molf_jax.generation import greedy_generate

PAD = 0
NEW = 5


@pytest.fixture(scope="module")
def tiny_gemma():
    # Local layers with a window of 4 and prompts longer than it; embeddings scaled up so the
    # random model's logits are far from ties.
    config = models.preset("gemma3-270m", vocab_size=64, hidden_size=32, intermediate_size=64,
                           num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                           sliding_window=4, layer_types=("sliding_attention", "full_attention"))
    model = models.build_model(config)
    params = models.init_params(model, jax.random.key(0))
    params["embed_tokens"]["embedding"] = params["embed_tokens"]["embedding"] * 30
    return model, params


def test_forced_rows_are_what_greedy_decoding_writes(tiny_gemma):
    model, params = tiny_gemma
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, 64, n)) for n in (9, 3, 6, 12, 1)]
    ids, mask = left_pad(prompts, pad_id=PAD, length=12)
    written = greedy_generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=None,
                              pad_token_id=PAD)
    assert len({tuple(row) for row in written}) > 1  # the model does not write one constant
    lengths = [0, 2, 4, 1, 3]
    rows = teacher_forced_argmax(model, params, prompts,
                                 [list(w[:k]) for w, k in zip(written, lengths)], pad_id=PAD,
                                 batch_size=2)  # three batches, the last one filled
    for row, w, k in zip(rows, written, lengths):
        np.testing.assert_array_equal(row, w[:k + 1])


def test_prompts_and_completions_must_pair_up(tiny_gemma):
    model, params = tiny_gemma
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        teacher_forced_argmax(model, params, [[4], [5]], [[6]], pad_id=PAD, batch_size=2)

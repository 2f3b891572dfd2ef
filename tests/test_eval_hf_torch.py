"""The transformers (torch) adapters: left padding gives the same tokens and logits as none."""

import numpy as np
import pytest

from molf_jax.data import byte_level_tokenizer, load_task
from molf_jax.eval import evaluate_task, left_pad
from molf_jax.eval.hf_torch import torch_generate_fn, torch_next_token_logits_fn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOK = byte_level_tokenizer()


@pytest.fixture(scope="module")
def tiny_torch_model():
    config = transformers.Qwen2Config(
        vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.5)  # varied greedy outputs
    return model


def test_left_padded_logits_equal_unpadded_logits(tiny_torch_model):
    rows = [[2, 40, 41, 42, 43, 44], [2, 50, 51]]
    ids, mask = left_pad(rows, pad_id=TOK.pad_token_id, length=8)
    batched = torch_next_token_logits_fn(tiny_torch_model)(ids, mask)
    for row, logits in zip(rows, batched):
        with torch.no_grad():
            alone = tiny_torch_model(torch.tensor([row])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits, alone, rtol=1e-4, atol=1e-4)


def test_left_padded_generation_equals_unpadded_generation(tiny_torch_model):
    rows = [[2, 40, 41, 42, 43, 44], [2, 50, 51]]
    ids, mask = left_pad(rows, pad_id=TOK.pad_token_id, length=8)
    generate = torch_generate_fn(tiny_torch_model, TOK, max_new_tokens=5)
    batched = generate(ids, mask)
    assert batched.shape == (2, 5) and batched.dtype == np.int32
    for row, tokens in zip(rows, batched):
        one = np.asarray([row], np.int32)
        np.testing.assert_array_equal(generate(one, np.ones_like(one))[0], tokens)


def test_fact_scores_with_the_adapter_equal_row_by_row_scores(tiny_torch_model):
    records = load_task("fact", size=3, seed=0).eval

    def row_by_row(input_ids, attention_mask):
        out = []
        for ids, mask in zip(input_ids, attention_mask):
            with torch.no_grad():
                real = torch.tensor([ids[mask == 1].tolist()])
                out.append(tiny_torch_model(real).logits[0, -1].numpy())
        return np.stack(out)

    adapter = evaluate_task("fact", None, None, TOK, records, batch_size=4,
                            next_token_logits_fn=torch_next_token_logits_fn(tiny_torch_model))
    reference = evaluate_task("fact", None, None, TOK, records, batch_size=4,
                              next_token_logits_fn=row_by_row)
    assert adapter == reference
    assert adapter["efficacy_score"]["n"] == 3

"""Greedy KV-cache generation against transformers' ``generate`` on tiny random models."""

import numpy as np
import pytest
import torch
from tiny_hf import gemma3_config, qwen2_config, random_model, save

from molf_jax import models
from molf_jax.checkpoints import load_hf
from molf_jax.generation import greedy_generate

PAD = 0
NEW = 10


def left_padded_prompts(seed=1):
    """Three prompts of lengths 7, 4 and 6, left-padded to 7."""
    ids = np.random.RandomState(seed).randint(3, 128, (3, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = PAD
    return ids, mask


def hf_generate(torch_model, ids, mask, eos):
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                   max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                                   eos_token_id=eos)
    out = out[:, ids.shape[1]:].numpy()
    # transformers stops once every row is done; the rest would be padding
    return np.pad(out, ((0, 0), (0, NEW - out.shape[1])), constant_values=PAD)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("generation")
    out = {}
    for name, config in (("qwen2", qwen2_config()), ("gemma3", gemma3_config())):
        torch_model = random_model(config, seed=3)
        out[name] = (torch_model, save(torch_model, root / name))
    return out


# Scanned Qwen2 checks the stacked cache; plain Gemma 3 checks local/global layers in the cache.
@pytest.mark.parametrize("name,scan", [("qwen2", True), ("gemma3", False)])
def test_greedy_matches_transformers_with_left_padding_and_eos(tiny_models, name, scan):
    torch_model, folder = tiny_models[name]
    config, params = load_hf(folder, scan_layers=scan)
    model = models.build_model(config, scan_layers=scan)
    ids, mask = left_padded_prompts()

    free = greedy_generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=None,
                           pad_token_id=PAD)
    np.testing.assert_array_equal(free, hf_generate(torch_model, ids, mask, eos=None))
    # 7-token prompts + 10 new tokens run well past Gemma's window of 4 in the cache

    # Make row 0's fourth token the EOS: row 0 must stop there, the others where they meet it.
    eos = int(free[0, 3])
    stopped = greedy_generate(model, params, ids, mask, max_new_tokens=NEW, eos_token_id=eos,
                              pad_token_id=PAD)
    np.testing.assert_array_equal(stopped, hf_generate(torch_model, ids, mask, eos=eos))
    first = int(np.argmax(free[0] == eos))
    assert first <= 3 and stopped[0, first] == eos
    assert (stopped[0, first + 1:] == PAD).all()


def test_generation_refuses_right_padding(tiny_models):
    _, folder = tiny_models["qwen2"]
    config, params = load_hf(folder)
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        greedy_generate(models.build_model(config), params, ids, mask[:, ::-1],
                        max_new_tokens=2, eos_token_id=None, pad_token_id=PAD)

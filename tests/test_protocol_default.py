"""A user's own data file trains under the library's protocol by default: the first step's
loss on a local file is transformers' NLL of the targets, with Gemma's BOS in front."""

import json
import os

import numpy as np
import torch
import transformers

from molf_jax.data import byte_level_tokenizer, load_task, render_example
from molf_jax.run_dir import RunDir
from molf_jax.train import train
from tiny_run import tiny_config, tiny_hf_folder

COUNTERFACT = os.path.join(os.path.dirname(__file__), "fixtures", "counterfact.json")


def _transformers_nll(model_dir, records) -> float:
    """Mean NLL over target tokens of ``<bos> prompt target`` as transformers computes it."""
    tok = byte_level_tokenizer()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    for record in records:
        example = render_example("fact", record, protocol="molf_jax")
        prompt = tok(example.prompt, add_special_tokens=False)["input_ids"]
        target = tok(example.target, add_special_tokens=False)["input_ids"]
        target += [tok.eos_token_id] if example.add_eos else []
        ids = torch.tensor([[tok.bos_token_id] + prompt + target])
        labels = torch.full_like(ids, -100)
        labels[0, -len(target):] = ids[0, -len(target):]
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()   # mean over the targets
        total += loss * len(target)
        count += len(target)
    return total / count


def test_first_step_loss_on_a_local_file_is_transformers_nll_of_the_targets(tmp_path):
    model_dir = tiny_hf_folder(tmp_path / "gemma", family="gemma3")
    records = load_task("fact", COUNTERFACT).train
    # One batch holds every training example, so step 1's loss is the mean over all targets.
    config = tiny_config(model_dir, tmp_path / "run", mode="fft", source=COUNTERFACT,
                         batch_size=len(records), steps=1, max_length=None)
    assert config.protocol is None and config.data_protocol == "molf_jax"
    train(config)
    [first] = [json.loads(line) for line in open(RunDir(tmp_path / "run").metrics)
               if json.loads(line)["step"] == 1]
    expected = _transformers_nll(model_dir, records)
    np.testing.assert_allclose(first["loss"], expected, rtol=1e-4)

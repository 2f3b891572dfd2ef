"""AdaLoRA exports: the merged HF folder and the PEFT AdaLoRA adapter give our logits.

A tiny random Qwen2 gets AdaLoRA triplets with random singular values and a rank pattern that
prunes some of them (one module entirely); `PeftModel.from_pretrained` on the torch base, and
transformers on the merged folder, must give the logits of our own forward pass with the
pattern applied.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from tiny_hf import hf_logits, padded_batch, qwen2_config, random_model, save

from molf_jax import models
from molf_jax.adalora import AdaLoraSchedule, AdaLoraSpec, adalora_triplets, add_adalora
from molf_jax.checkpoints import load_hf, save_hf
from molf_jax.checkpoints.folders import FolderError
from molf_jax.checkpoints.peft_adalora import save_peft_adalora_adapter

SPEC = AdaLoraSpec(init_r=4, alpha=8.0, dropout=0.0)
SCHEDULE = AdaLoraSchedule(total_step=20, init_r=4, target_r=2)
TOL = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("adalora_export")
    tiny = qwen2_config(hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    folder = save(random_model(tiny), root / "base")
    config, params = load_hf(folder, scan_layers=True)
    params = add_adalora(params, SPEC, jax.random.key(0))
    rng = np.random.RandomState(0)
    keep, e_kept = {}, {}

    def trained(path, leaf):
        if getattr(path[-1], "key", None) == "e":
            return jnp.asarray(0.5 * rng.standard_normal(leaf.shape), leaf.dtype)
        return leaf

    params = jax.tree_util.tree_map_with_path(trained, params)
    for index, (path, triplet) in enumerate(adalora_triplets(params)):
        mask = rng.rand(*triplet["e"].shape) < 0.5
        if index == 0:
            mask[0] = False  # one layer's module keeps nothing
        keep[path] = mask
    params = _with_pattern(params, keep)
    ids, mask = padded_batch()
    model = models.build_model(config, lora=SPEC, scan_layers=True)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    save_hf(root / "merged", params, config, lora=SPEC)
    save_peft_adalora_adapter(root / "adapter", params, config, SPEC, SCHEDULE, keep,
                              base_model_name_or_path=str(folder))
    return root, folder, keep, ours, ids, mask, config, params


def _with_pattern(params, keep):
    """The pruned singular values set to 0, as the allocator leaves them."""
    def visit(tree, path):
        out = {}
        for key, value in tree.items():
            if key == "adalora":
                out[key] = {**value, "e": jnp.where(keep["/".join(path)], value["e"], 0.0)}
            elif isinstance(value, dict):
                out[key] = visit(value, (*path, key))
            else:
                out[key] = value
        return out

    return visit(params, ())


def valid(logits, mask):
    return logits[mask == 1]


def test_peft_loads_the_adapter_with_our_logits(exported):
    root, folder, keep, ours, ids, mask, _, _ = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base.eval(), root / "adapter").eval()
    theirs = hf_logits(model, ids, mask)
    assert np.max(np.abs(valid(theirs, mask) - valid(ours, mask))) <= TOL * np.max(np.abs(ours))
    # peft shrank every module to the singular values the pattern kept.
    ranks = {name: module.lora_E["default"].shape[0]
             for name, module in model.base_model.model.named_modules()
             if hasattr(module, "lora_E") and "default" in module.lora_E}
    expected = sorted(int(k.sum()) for m in keep.values() for k in m)
    assert sorted(ranks.values()) == expected and 0 in expected
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4


def test_merged_folder_gives_our_logits(exported):
    root, _, _, ours, ids, mask, _, _ = exported
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / "merged",
                                                               dtype=torch.float32)
    theirs = hf_logits(merged.eval(), ids, mask)
    assert np.max(np.abs(valid(theirs, mask) - valid(ours, mask))) <= TOL * np.max(np.abs(ours))


def test_the_adapter_changes_the_model(exported):
    root, folder, _, ours, ids, mask, _, _ = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plain = hf_logits(base.eval(), ids, mask)
    assert np.max(np.abs(valid(plain, mask) - valid(ours, mask))) > 100 * TOL * np.max(
        np.abs(ours))


def test_the_adapter_never_writes_over_a_model_it_did_not_write(exported):
    _, folder, keep, _, _, _, config, params = exported
    before = sorted((p.name, p.stat().st_size) for p in folder.iterdir())
    with pytest.raises(FolderError, match="molf_jax did not write"):
        save_peft_adalora_adapter(folder, params, config, SPEC, SCHEDULE, keep,
                                  base_model_name_or_path=None)
    assert sorted((p.name, p.stat().st_size) for p in folder.iterdir()) == before

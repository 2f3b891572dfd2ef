"""LoRA experts as parameter leaves: layout, init, scaling, targets, dropout, merge and export."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from tiny_hf import hf_logits, padded_batch, qwen2_config, random_model, save

from molf_jax import models
from molf_jax.checkpoints import load_hf, save_hf
from molf_jax.param_roles import param_roles, trainable_mask
from molf_jax.lora import (
    LoraExpert,
    LoraSpec,
    add_lora_experts,
    lora_paths,
    merge_lora,
    strip_lora,
)

TWO_EXPERTS = LoraSpec(experts=(LoraExpert(2, 4), LoraExpert(8, 16)), targets=("q_proj", "up_proj"),
                       dropout=0.0)


def shapes(tree):
    return jax.tree_util.tree_map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), tree)


def tiny_config(**overrides):
    fields = dict(vocab_size=32, hidden_size=8, intermediate_size=12, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=4, tie_word_embeddings=False)
    return models.Qwen2Config(**{**fields, **overrides})


def with_random_b(params, seed=0):
    """Gives every ``b`` (zero at init) random values so the experts change the output."""
    rng = np.random.RandomState(seed)

    def perturb(path, leaf):
        if jax.tree_util.keystr(path).endswith("['b']"):
            return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
        return leaf
    return jax.tree_util.tree_map_with_path(perturb, params)


def random_params(model, seed=0):
    """Random values for every leaf of ``model`` (``b`` stays zero), without compiling init."""
    rng = np.random.RandomState(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("['b']"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(fill, models.abstract_params(model))


def test_lora_leaves_sit_beside_the_kernels_they_adapt():
    model = models.build_model(tiny_config(num_layers=1), lora=TWO_EXPERTS,
                               param_dtype=jnp.bfloat16)
    params = models.abstract_params(model)
    bf = "bfloat16"
    linear = lambda i, o: {"kernel": ((i, o), bf)}
    adapted = lambda i, o, extra=None: {
        "kernel": ((i, o), bf), "lora_1": {"a": ((i, 2), bf), "b": ((2, o), bf)},
        "lora_2": {"a": ((i, 8), bf), "b": ((8, o), bf)}, **(extra or {})}
    assert shapes(params) == {
        "embed_tokens": {"embedding": ((32, 8), bf)},
        "layers": {"0": {
            "input_layernorm": {"scale": ((8,), bf)},
            "post_attention_layernorm": {"scale": ((8,), bf)},
            "self_attn": {
                "q_proj": adapted(8, 8, {"bias": ((8,), bf)}),
                "k_proj": {**linear(8, 4), "bias": ((4,), bf)},
                "v_proj": {**linear(8, 4), "bias": ((4,), bf)},
                "o_proj": linear(8, 8)},
            "mlp": {"gate_proj": linear(8, 12), "up_proj": adapted(8, 12),
                    "down_proj": linear(12, 8)}}},
        "norm": {"scale": ((8,), bf)},
        "lm_head": {"kernel": ((8, 32), bf)},
    }


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_add_lora_experts_builds_the_tree_the_model_expects(scan):
    config = tiny_config()
    base = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype), models.abstract_params(
        models.build_model(config, scan_layers=scan)))
    expected = models.abstract_params(models.build_model(config, lora=TWO_EXPERTS,
                                                         scan_layers=scan))
    added = add_lora_experts(base, TWO_EXPERTS, jax.random.key(1))
    assert shapes(added) == shapes(expected)
    assert jax.tree_util.tree_structure(strip_lora(added)) == jax.tree_util.tree_structure(base)
    prefix = "layers/" if scan else "layers/1/"
    assert f"{prefix}self_attn/q_proj/lora_2/b" in lora_paths(added)
    lora_only = param_roles(added, train_base=False, train_others=False)
    assert sum(jax.tree_util.tree_leaves(trainable_mask(lora_only))) == len(
        lora_paths(added)) == 4 * 2 * (1 if scan else config.num_layers)


def test_init_is_kaiming_uniform_a_and_zero_b():
    config = tiny_config(hidden_size=64, intermediate_size=96, num_heads=4, head_dim=16)
    # the model's own init; add_lora_experts shares the initializer
    spec = LoraSpec(experts=(LoraExpert(32, 32),), targets=("down_proj",))
    params = models.init_params(models.build_model(config, lora=spec), jax.random.key(0))
    for layer in ("0", "1"):
        expert = params["layers"][layer]["mlp"]["down_proj"]["lora_1"]
        bound = 1 / math.sqrt(96)  # fan-in of down_proj
        a = np.asarray(expert["a"])
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
        assert abs(a.mean()) < 0.1 * bound and abs(a.std() - bound / math.sqrt(3)) < 0.1 * bound
        assert not np.asarray(expert["b"]).any()
    # different layers and experts draw different matrices
    assert not np.array_equal(params["layers"]["0"]["mlp"]["down_proj"]["lora_1"]["a"],
                              params["layers"]["1"]["mlp"]["down_proj"]["lora_1"]["a"])


def test_scaling_is_rslora_by_default():
    experts = (LoraExpert(16, 32), LoraExpert(128, 256))
    assert LoraSpec(experts=experts).scales == (32 / 4, 256 / math.sqrt(128))
    assert LoraSpec(experts=experts, rslora=False).scales == (2.0, 2.0)


def test_targets_by_name_or_pattern_and_never_lm_head():
    spec = LoraSpec(targets=("layers/[01]/self_attn/(q|v)_proj", "down_proj", ".*"))
    assert spec.matches("layers/1/self_attn/v_proj") and spec.matches("layers/mlp/down_proj")
    assert not spec.matches("lm_head") and not spec.matches("embed_tokens")
    narrow = LoraSpec(targets=("layers/0/self_attn/(q|v)_proj",))
    params = models.abstract_params(models.build_model(tiny_config(), lora=narrow))
    assert {p.rsplit("/lora_", 1)[0] for p in lora_paths(params)} == {
        "layers/0/self_attn/q_proj", "layers/0/self_attn/v_proj"}
    with pytest.raises(ValueError, match="matched no linear"):
        add_lora_experts(strip_lora(params), LoraSpec(targets=("lm_head",)), jax.random.key(0))


def test_dropout_acts_on_the_lora_path_only():
    config = tiny_config()
    spec = LoraSpec(experts=(LoraExpert(4, 8),), dropout=0.5)
    model = models.build_model(config, lora=spec)
    params = random_params(model)
    ids = jnp.arange(12).reshape(2, 6)
    run = jax.jit(lambda p, seed: model.apply({"params": p}, ids, deterministic=False,
                                              rngs={"dropout": jax.random.key(seed)}))
    # b = 0: the LoRA path adds nothing, so if the base path had dropout the seeds would differ
    np.testing.assert_array_equal(run(params, 1), run(params, 2))
    adapted = with_random_b(params)
    np.testing.assert_array_equal(run(adapted, 1), run(adapted, 1))
    assert not np.allclose(run(adapted, 1), run(adapted, 2))


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    torch_model = random_model(qwen2_config(num_hidden_layers=2))
    return save(torch_model, tmp_path_factory.mktemp("lora") / "qwen2")


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_merge_keeps_logits_and_merged_export_reloads_in_transformers(qwen_folder, tmp_path,
                                                                       scan):
    spec = LoraSpec(experts=(LoraExpert(4, 8), LoraExpert(8, 8)))
    config, base = load_hf(qwen_folder, scan_layers=scan)
    params = with_random_b(add_lora_experts(base, spec, jax.random.key(0)))
    ids, mask = padded_batch(length=10)
    real = mask.astype(bool)

    lora_model = models.build_model(config, lora=spec, scan_layers=scan)
    plain = jax.jit(models.build_model(config, scan_layers=scan).apply)
    with_experts = np.asarray(lora_model.apply({"params": params}, ids, mask))
    merged = merge_lora(params, spec)
    assert not lora_paths(merged)
    after_merge = np.asarray(plain({"params": merged}, ids, mask))
    before = np.asarray(plain({"params": base}, ids, mask))
    assert np.abs(with_experts - before)[real].max() > 1e-2  # the experts matter
    np.testing.assert_allclose(after_merge[real], with_experts[real], atol=1e-5)

    export = save_hf(tmp_path / "merged", params, config, lora=spec, source_dir=qwen_folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    np.testing.assert_allclose(hf_logits(reloaded, ids, mask)[real], with_experts[real],
                               atol=1e-4)


def test_save_refuses_unmerged_lora_leaves(qwen_folder, tmp_path):
    config, base = load_hf(qwen_folder)
    params = add_lora_experts(base, LoraSpec(experts=(LoraExpert(2, 2),)), jax.random.key(0))
    with pytest.raises(ValueError, match="LoRA leaves"):
        save_hf(tmp_path / "x", params, config)
